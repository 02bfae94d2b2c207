"""Stage 2: the encoders that fill the caches: a VAE's posterior moments and DINOv2 patch tokens of every subset
image (row stores, `urepa.rowstore`), and CLIP text embeddings of every class prompt and the null prompt.

Row i of the latent and token caches is row i of the subset CSV; each cache records its encoder's fingerprint,
shapes and preprocessing, which training checks against its own inputs.
"""
from __future__ import annotations

import hashlib
import shutil
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import zarr

from .digests import file_digest, weights_fingerprint
from .images import dinov2_transform, dinov2_view, vae_transform
from .rowstore import SHARD_ROWS, build_image_cache
from .runtime import progress
from .subset import prompt_for
from .vae import SD15_VAE, LatentNormalisation, vae_record


def build_vae_cache(csv_path, out_path, vae_dir, image_size: int, batch_size: int, num_workers: int,
                    device: torch.device, shard_rows: int = SHARD_ROWS, part: tuple[int, int] | None = None,
                    vae_name: str = SD15_VAE) -> Path:
    """Posterior mean and std per image of the AutoencoderKL in `vae_dir` (VAE `vae_name`: SD-1.5's own or a
    `vaes:` entry), raw (before the VAE's latent normalisation, which training applies), as float16.

    Both moments are kept so training can draw z = mean + std * eps afresh every step, as SD training
    on images does; keeping only the mean would silently remove that augmentation.
    """
    from .vae import load_autoencoder

    vae = load_autoencoder(vae_dir, device)
    factor = 2 ** (len(vae.config.block_out_channels) - 1)
    latent_shape = (vae.config.latent_channels, image_size // factor, image_size // factor)

    @torch.no_grad()
    def encode(images: torch.Tensor) -> dict[str, np.ndarray]:
        posterior = vae.encode(images.to(device)).latent_dist
        return {"mean": posterior.mean.half().cpu().numpy(), "std": posterior.std.half().cpu().numpy()}

    record = vae_record(vae_name, vae_dir)
    attrs = {"cache": "vae_latents", "encoder": f"vae:{vae_name}", "vae": record,
             "encoder_fingerprint": record["fingerprint"], "image_size": image_size, "latent_shape": list(latent_shape),
             "dim": latent_shape[0], "grid": latent_shape[1], "patch_size": factor,
             "normalisation": asdict(LatentNormalisation.from_config(vae.config)), "posterior": "mean+std (raw)"}
    return build_image_cache(csv_path, out_path, {"mean": (latent_shape, "float16"), "std": (latent_shape, "float16")},
                             attrs, vae_transform(image_size), (3, image_size, image_size), encode,
                             batch_size, num_workers, "VAE latents", shard_rows, part, device)


def build_dino_cache(csv_path, out_path, dinov2_path, image_size: int, input_size: int, batch_size: int,
                     num_workers: int, device: torch.device, shard_rows: int = SHARD_ROWS,
                     part: tuple[int, int] | None = None) -> Path:
    """Final-norm DINOv2 patch tokens, L2-normalised, float16, of the same `image_size` square the VAE
    cache encodes, resized to `input_size` (see `dinov2_transform`)."""
    from .dinov2 import load_dinov2

    encoder = load_dinov2(dinov2_path, device)
    meta = encoder.metadata(input_size)

    @torch.no_grad()
    def encode(images: torch.Tensor) -> dict[str, np.ndarray]:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            tokens = encoder(images.to(device))
        return {"tokens": tokens.float().half().cpu().numpy()}

    attrs = {"cache": "dino_tokens", **meta, "encoder_fingerprint": weights_fingerprint(dinov2_path),
             "view": dinov2_view(image_size, input_size), "num_tokens": meta["grid"] ** 2}
    return build_image_cache(csv_path, out_path, {"tokens": ((meta["grid"] ** 2, meta["dim"]), "float16")},
                             attrs, dinov2_transform(image_size, input_size), (3, input_size, input_size), encode,
                             batch_size, num_workers, "DINOv2 tokens", shard_rows, part, device)


@torch.no_grad()
def build_clip_cache(classes_csv, out_path, sd15_dir, device: torch.device, batch_size: int = 64) -> Path:
    """CLIP text-encoder hidden states of "a photo of a {name}" for every class, then the empty prompt
    (the null condition) as the last row: [num_classes + 1, 77, dim]."""
    from .sd15 import load_text_encoder

    classes = pd.read_csv(classes_csv)
    prompts = [prompt_for(name) for name in classes["name"]] + [""]
    tokenizer, text_encoder = load_text_encoder(sd15_dir, device)
    chunks = []
    for start in progress(range(0, len(prompts), batch_size), desc="CLIP prompts", unit="batch"):
        ids = tokenizer(prompts[start:start + batch_size], padding="max_length", truncation=True,
                        max_length=tokenizer.model_max_length, return_tensors="pt").input_ids
        chunks.append(text_encoder(ids.to(device))[0].half().cpu().numpy())
    embeddings = np.concatenate(chunks)
    out_path = Path(out_path)
    partial = out_path.with_name(out_path.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    group = zarr.open_group(str(partial), mode="w")
    # All prompts in one shard file (1001 x 77 x 768 fp16 is 118 MB), a row per chunk as the image caches.
    group.create_array("embeddings", data=embeddings, chunks=(1, *embeddings.shape[1:]), shards=embeddings.shape)
    group.attrs.update({
        "cache": "clip_embeddings", "encoder": f"sd15-text-encoder:{Path(sd15_dir).name}",
        "encoder_fingerprint": weights_fingerprint(Path(sd15_dir) / "text_encoder"),
        "dim": int(embeddings.shape[-1]), "max_length": int(embeddings.shape[1]),
        "prompts": prompts, "null_index": len(prompts) - 1, "classes_sha256": file_digest(classes_csv),
        "data_sha256": {"embeddings": hashlib.sha256(np.ascontiguousarray(embeddings)).hexdigest()},  # verify_cache
        "complete": True,
    })
    if out_path.exists():
        shutil.rmtree(out_path)
    partial.rename(out_path)
    return out_path
