"""Stage 4: class-balanced samples from the trained (EMA) weights with classifier-free guidance.

The sampling loop is written out rather than taken from StableDiffusionPipeline because guidance is
applied only inside a timestep interval (REPA's guidance_high / guidance_low), which the pipeline
cannot do; models, schedulers and LoRA loading are diffusers' own. Image i is drawn from its own
seeded initial noise, so a sample set is reproducible and a killed job resumes image by image.
"""
from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from .runtime import disk_full_named, progress, provenance, set_aside
from .sample_sets import class_of, shard_indices
from .vae import LatentNormalisation

log = logging.getLogger(__name__)

SAMPLERS = {
    "ddim": ("DDIMScheduler", {}),
    "euler": ("EulerDiscreteScheduler", {}),
    "dpmpp": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++", "solver_order": 2}),
}


def make_sampler(name: str, trained_config):
    """A diffusers scheduler of the chosen kind on the schedule and parameterisation the weights were
    trained for (`trained_config`: their exported scheduler config)."""
    import diffusers

    if name not in SAMPLERS:
        raise ValueError(f"sampler must be one of {sorted(SAMPLERS)}, got {name!r}")
    cls_name, extra = SAMPLERS[name]
    return getattr(diffusers, cls_name).from_config(trained_config, **extra)


def noise_level(scheduler, fraction: float) -> float:
    """sigma = sqrt((1 - abar) / abar) of the training timestep t = fraction * T (clamped to the schedule):
    the guidance interval on the noise-level axis that EDM-style papers quote."""
    num_train = scheduler.config.num_train_timesteps
    alpha_bar = float(scheduler.alphas_cumprod[min(num_train - 1, round(fraction * num_train))])
    return ((1 - alpha_bar) / alpha_bar) ** 0.5


def initial_noise(index: int, seed: int, shape: tuple[int, ...]) -> torch.Tensor:
    """Image `index`'s starting noise, drawn on the CPU so it is the same on every device."""
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed * 1_000_003 + index))


@torch.no_grad()
def sample_latents(unet, scheduler, cond: torch.Tensor, uncond: torch.Tensor, noise: torch.Tensor, steps: int,
                   cfg_scale: float, guidance_low: float, guidance_high: float) -> torch.Tensor:
    """Denoise `noise` with CFG applied only while guidance_low <= t / T <= guidance_high."""
    num_train = scheduler.config.num_train_timesteps
    scheduler.set_timesteps(steps, device=noise.device)
    latents = noise * scheduler.init_noise_sigma
    for t in scheduler.timesteps:
        model_input = scheduler.scale_model_input(latents, t)
        guided = cfg_scale != 1.0 and guidance_low <= float(t) / num_train <= guidance_high
        if guided:
            out_uncond, out_cond = unet(torch.cat([model_input] * 2), t,
                                        encoder_hidden_states=torch.cat([uncond, cond])).sample.chunk(2)
            out = out_uncond + cfg_scale * (out_cond - out_uncond)
        else:
            out = unet(model_input, t, encoder_hidden_states=cond).sample
        latents = scheduler.step(out, t, latents).prev_sample
    return latents


@torch.no_grad()
def decode(vae, latents: torch.Tensor) -> np.ndarray:
    """uint8 images [B, H, W, 3] of the U-Net's latents, undoing the VAE's own latent normalisation (its config)."""
    images = vae.decode(LatentNormalisation.from_config(vae.config).denormalise(latents.to(vae.dtype))).sample
    return ((images.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()


def generate_samples(pipe, clip_embeddings: np.ndarray, null_index: int, num_classes: int, images_per_class: int,
                     out_dir: str | Path, settings: dict, seed: int, batch_size: int, weights_digest: str,
                     shards: int = 1, shard: int = 0, vae: dict | None = None) -> Path:
    """Write images_per_class PNGs of every class to out_dir (via out_dir.partial, resumable), or the images of
    one shard of that set (`shard_indices`; `gather_samples` joins the shards). `vae`: the record (`urepa.vae.
    vae_record`) of the VAE `pipe` decodes with, kept in sampling.json.

    A partial set is continued only if it was started by the same weights (`weights_digest`, e.g.
    `digests.directory_digest` of the weights folder), sampler settings, seed, batch size and index range; one of
    any other identity is set aside, so a set never mixes images of two models."""
    out_dir = Path(out_dir)
    partial = out_dir.with_name(out_dir.name + ".partial")
    total = num_classes * images_per_class
    indices = shard_indices(total, batch_size, shards, shard)
    manifest = {"weights_sha256": weights_digest, "batch_size": batch_size, "sampler": settings["sampler"],
                "steps": settings["steps"], "cfg_scale": settings["cfg_scale"],
                "guidance_low": settings["guidance_low"], "guidance_high": settings["guidance_high"],
                "guidance_sigma_low": noise_level(pipe.scheduler, settings["guidance_low"]),
                "guidance_sigma_high": noise_level(pipe.scheduler, settings["guidance_high"]),
                "prediction_type": pipe.scheduler.config.prediction_type, "seed": seed, "num_classes": num_classes,
                "images_per_class": images_per_class,
                "vae": vae and {"name": vae["name"], "fingerprint": vae["fingerprint"]},  # not its path: may move
                "indices": [indices.start, indices.stop]}
    manifest_path = partial / "sampling.json"
    if partial.exists() and (not manifest_path.exists() or json.loads(manifest_path.read_text()) != manifest):
        set_aside(partial, "was sampled from other weights or settings")
    partial.mkdir(parents=True, exist_ok=True)
    manifest_path.write_text(json.dumps(manifest, indent=2))

    device = pipe.unet.device
    scheduler = make_sampler(settings["sampler"], pipe.scheduler.config)
    batches = [range(start, min(start + batch_size, indices.stop))
               for start in range(indices.start, indices.stop, batch_size)]
    todo = [batch for batch in batches if not all((partial / f"{i:06d}.png").exists() for i in batch)]
    if len(todo) < len(batches):
        log.info("resuming sampling: %d of %d batches already written", len(batches) - len(todo), len(batches))
    if todo:  # who drew which images: a resumed set may have been drawn on two machines
        sessions_path = partial / "provenance.json"
        sessions = json.loads(sessions_path.read_text()) if sessions_path.exists() else []
        sessions.append(provenance(device, dtype=str(pipe.unet.dtype).removeprefix("torch."),
                                   images=[todo[0].start, todo[-1].stop]))
        sessions_path.write_text(json.dumps(sessions, indent=2))
    clip = torch.from_numpy(np.asarray(clip_embeddings)).to(device, pipe.unet.dtype)
    channels, size = pipe.unet.config.in_channels, pipe.unet.config.sample_size
    for batch in progress(todo, desc="sample", unit="batch"):
        noise = torch.stack([initial_noise(i, seed, (channels, size, size)) for i in batch]).to(device)
        cond = clip[[class_of(i, images_per_class) for i in batch]]
        uncond = clip[[null_index] * len(batch)]
        latents = sample_latents(pipe.unet, scheduler, cond, uncond, noise.to(pipe.unet.dtype), settings["steps"],
                                 settings["cfg_scale"], settings["guidance_low"], settings["guidance_high"])
        for i, image in zip(batch, decode(pipe.vae, latents)):
            tmp = partial / f"{i:06d}.tmp.png"
            with disk_full_named(tmp):
                Image.fromarray(image).save(tmp)
            tmp.rename(partial / f"{i:06d}.png")  # a PNG that exists is complete
    if out_dir.exists():
        shutil.rmtree(out_dir)
    partial.rename(out_dir)
    return out_dir
