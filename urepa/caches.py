"""Stage 2: zarr caches of SD-VAE latents, DINOv2 patch tokens and CLIP prompt embeddings.

Row i of the latent and token caches is row i of the subset CSV. Every cache carries its metadata
(encoder, fingerprint of its weights, shapes, preprocessing, CSV digest) in the group's attributes;
`check_cache` compares them with what a later stage expects and stops with a clear error.

Building is resumable: rows are written into `<cache>.partial/` next to the final path, each batch
marked done after its data is written, and the folder is renamed to its final name only when every
row is done. Snakemake deletes a rule's declared outputs before the job starts, so the partial
folder is deliberately not an output: a killed job started again finds it and encodes only the
rows that are not done yet.
"""
from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import shutil
from pathlib import Path
from typing import Callable

import numpy as np
import pandas as pd
import torch
import zarr
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from torchvision import transforms
from zarr.core.sync import sync

from .runtime import progress, set_aside

from .subset import prompt_for

log = logging.getLogger(__name__)

DONE_CHUNK = 4096
# Arrays stored without compression. Unit-norm float16 DINOv2 tokens are close to incompressible (zstd
# saves ~8 % of their bytes) while decoding them took two thirds of a training batch's read time
# (benchmarks/data_read.py); the small latent arrays keep zarr's default zstd.
UNCOMPRESSED = frozenset({"tokens"})


class CacheMismatchError(RuntimeError):
    """A cache was built from other inputs than the ones this run uses."""


def file_digest(path: str | Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def directory_digest(path: str | Path) -> str:
    """SHA-256 over every file's relative name and full contents: the identity of exported weights. (A
    partial fine-tune changes tensors in the middle of a 3.4 GB file, which `weights_fingerprint` skips.)"""
    path = Path(path)
    digest = hashlib.sha256()
    for file in sorted(p for p in path.rglob("*") if p.is_file()):
        digest.update(str(file.relative_to(path)).encode() + b"\0")
        with open(file, "rb") as f:
            while block := f.read(1 << 24):
                digest.update(block)
    return digest.hexdigest()


def content_digest(group: zarr.Group) -> str:
    """Identity of a sealed cache's contents for a training run: its metadata (inputs, encoder, view, the
    invalid rows and why) and its valid-row mask. A cache rebuilt from damaged images differs here."""
    digest = hashlib.sha256(json.dumps(dict(group.attrs), sort_keys=True, default=str).encode())
    if "valid" in group:
        digest.update(np.asarray(group["valid"][:]).tobytes())
    return digest.hexdigest()[:16]


def weights_fingerprint(path: str | Path) -> str:
    """A cheap identity of a model folder or checkpoint file: configs in full, and every weight file's
    name, size and first and last MiB. Distinguishes checkpoints without hashing gigabytes."""
    path = Path(path)
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    digest = hashlib.sha256()
    for file in files:
        digest.update(str(file.relative_to(path) if path.is_dir() else file.name).encode())
        size = file.stat().st_size
        digest.update(str(size).encode())
        with open(file, "rb") as f:
            if file.suffix in {".json", ".txt"}:
                digest.update(f.read())
            else:
                digest.update(f.read(1 << 20))
                f.seek(max(0, size - (1 << 20)))
                digest.update(f.read())
    return digest.hexdigest()[:16]


def vae_transform(image_size: int) -> transforms.Compose:
    """Shorter side to `image_size` (bicubic), centre crop, scale to [-1, 1] as SD-1.5 was trained."""
    return transforms.Compose([
        transforms.Resize(image_size, interpolation=transforms.InterpolationMode.BICUBIC, antialias=True),
        transforms.CenterCrop(image_size),
        transforms.ToTensor(),
        transforms.Normalize([0.5], [0.5]),
    ])


# Smaller images carry too little to encode at 512 px or to score at 299 px: such a file is treated as unusable,
# like an unreadable one (ImageNet's smallest real images are well above this).
MIN_IMAGE_SIDE = 32


class UnusableImage(ValueError):
    """An image file that opens but is too small to use."""


def open_rgb(path: str | Path) -> Image.Image:
    """An image file as a fully decoded RGB image; raises, saying why, for an unreadable or too small file."""
    with Image.open(path) as image:
        if min(image.size) < MIN_IMAGE_SIDE:
            raise UnusableImage(f"{image.size[0]}x{image.size[1]} px is smaller than {MIN_IMAGE_SIDE} px on a side")
        return image.convert("RGB")


class ImageRows(Dataset):
    """Images of chosen CSV rows. An unreadable image yields a zero tensor and the reason, so the
    batch goes on and the row is recorded as invalid (never written as if it were data)."""

    def __init__(self, paths: list[str], rows: np.ndarray, transform: Callable, shape: tuple[int, ...]):
        self.paths, self.rows, self.transform, self.shape = paths, rows, transform, shape

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int):
        row = int(self.rows[i])
        try:
            return row, self.transform(open_rgb(self.paths[row])), ""
        except Exception as error:  # corrupt, truncated, missing, unsupported or too small file
            return row, torch.zeros(self.shape), f"{type(error).__name__}: {error}"


def _open_partial(partial: Path, arrays: dict[str, tuple[tuple[int, ...], str]], num_rows: int,
                  attrs: dict) -> zarr.Group:
    """Reopen a partial cache built from the same inputs, or start a new one."""
    if partial.exists():
        group = zarr.open_group(str(partial), mode="r+")
        if group.attrs.get("build") == attrs["build"]:
            return group
        set_aside(partial, "was started from other inputs or settings")
    group = create_row_cache(partial, arrays, num_rows)
    group.attrs.update({**attrs, "errors": [], "complete": False})
    return group


def create_row_cache(path: str | Path, arrays: dict[str, tuple[tuple[int, ...], str]], num_rows: int) -> zarr.Group:
    """A new, empty row cache at `path`: one [num_rows, *row_shape] array per entry of `arrays` (NaN until
    written), plus the `done` and `valid` row flags. The one place the on-disk layout is decided; the
    data-read benchmark builds its real-tier-shaped caches with it too."""
    group = zarr.open_group(str(path), mode="w")
    for name, (row_shape, dtype) in arrays.items():
        # One row per chunk: training reads random rows, and a row is the unit that is written.
        group.create_array(name, shape=(num_rows, *row_shape), chunks=(1, *row_shape), dtype=dtype,
                           fill_value=np.nan, compressors=None if name in UNCOMPRESSED else "auto")
    group.create_array("done", shape=(num_rows,), chunks=(DONE_CHUNK,), dtype=bool, fill_value=False)
    group.create_array("valid", shape=(num_rows,), chunks=(DONE_CHUNK,), dtype=bool, fill_value=False)
    return group


def build_image_cache(csv_path: str | Path, out_path: str | Path, arrays: dict[str, tuple[tuple[int, ...], str]],
                      attrs: dict, transform: Callable, image_shape: tuple[int, ...],
                      encode: Callable[[torch.Tensor], dict[str, np.ndarray]], batch_size: int,
                      num_workers: int, desc: str) -> Path:
    """Encode every CSV row's image into `arrays` of a zarr group at `out_path`, resumably."""
    csv_path, out_path = Path(csv_path), Path(out_path)
    table = pd.read_csv(csv_path)
    # The batch size is part of the build: batched convolutions round differently (outputs differ by an LSB).
    attrs = {**attrs, "csv_sha256": file_digest(csv_path), "num_rows": len(table), "batch_size": batch_size}
    attrs["build"] = hashlib.sha256(json.dumps(attrs, sort_keys=True).encode()).hexdigest()[:16]
    partial = out_path.with_name(out_path.name + ".partial")
    group = _open_partial(partial, arrays, len(table), attrs)
    todo = np.flatnonzero(~group["done"][:])
    if len(todo) < len(table):
        log.info("%s: resuming, %d of %d rows already done", out_path.name, len(table) - len(todo), len(table))
    loader = DataLoader(ImageRows(table["img_path"].tolist(), todo, transform, image_shape),
                        batch_size=batch_size, num_workers=num_workers)
    errors = list(group.attrs["errors"])
    for rows, images, problems in progress(loader, desc=desc, unit="batch"):
        rows = rows.numpy()
        ok = np.array([not p for p in problems])
        for row, problem in zip(rows[~ok], np.array(problems)[~ok]):
            log.warning("row %d (%s) is invalid: %s", row, table["img_path"][row], problem)
            errors.append({"row": int(row), "id": str(table["id"][row]), "path": table["img_path"][row],
                           "error": str(problem)})
        if ok.any():
            encoded = encode(images[torch.from_numpy(ok)])
            for name, values in encoded.items():
                group[name].oindex[rows[ok]] = values
        if not ok.all():
            group.attrs["errors"] = errors
        group["valid"].oindex[rows] = ok
        group["done"].oindex[rows] = True  # last: a row counts as done only once its data is on disk
    group.attrs.update({"complete": True, "num_invalid": len(errors)})
    out_path.parent.mkdir(parents=True, exist_ok=True)
    if out_path.exists():
        shutil.rmtree(out_path)
    partial.rename(out_path)
    return out_path


def build_vae_cache(csv_path, out_path, sd15_dir, image_size: int, batch_size: int, num_workers: int,
                    device: torch.device) -> Path:
    """Posterior mean and std of SD-1.5's VAE per image, unscaled, as float16.

    Both moments are kept so training can draw z = mean + std * eps afresh every step, as SD training
    on images does; keeping only the mean would silently remove that augmentation.
    """
    from .sd15 import load_vae

    vae = load_vae(sd15_dir, device)
    factor = 2 ** (len(vae.config.block_out_channels) - 1)
    latent_shape = (vae.config.latent_channels, image_size // factor, image_size // factor)

    @torch.no_grad()
    def encode(images: torch.Tensor) -> dict[str, np.ndarray]:
        posterior = vae.encode(images.to(device)).latent_dist
        return {"mean": posterior.mean.half().cpu().numpy(), "std": posterior.std.half().cpu().numpy()}

    attrs = {"cache": "vae_latents", "encoder": f"sd15-vae:{Path(sd15_dir).name}",
             "encoder_fingerprint": weights_fingerprint(Path(sd15_dir) / "vae"),
             "image_size": image_size, "latent_shape": list(latent_shape),
             "dim": latent_shape[0], "grid": latent_shape[1], "patch_size": factor,
             "scaling_factor": vae.config.scaling_factor, "posterior": "mean+std (unscaled)"}
    return build_image_cache(csv_path, out_path, {"mean": (latent_shape, "float16"), "std": (latent_shape, "float16")},
                             attrs, vae_transform(image_size), (3, image_size, image_size), encode,
                             batch_size, num_workers, "VAE latents")


def build_dino_cache(csv_path, out_path, dinov2_path, image_size: int, input_size: int, batch_size: int,
                     num_workers: int, device: torch.device) -> Path:
    """Final-norm DINOv2 patch tokens, L2-normalised, float16, of the same `image_size` square the VAE
    cache encodes, resized to `input_size` (see `dinov2_transform`)."""
    from .dinov2 import dinov2_transform, dinov2_view, load_dinov2

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
                             batch_size, num_workers, "DINOv2 tokens")


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
    group.create_array("embeddings", data=embeddings, chunks=(1, *embeddings.shape[1:]))
    group.attrs.update({
        "cache": "clip_embeddings", "encoder": f"sd15-text-encoder:{Path(sd15_dir).name}",
        "encoder_fingerprint": weights_fingerprint(Path(sd15_dir) / "text_encoder"),
        "dim": int(embeddings.shape[-1]), "max_length": int(embeddings.shape[1]),
        "prompts": prompts, "null_index": len(prompts) - 1, "classes_sha256": file_digest(classes_csv),
        "complete": True,
    })
    if out_path.exists():
        shutil.rmtree(out_path)
    partial.rename(out_path)
    return out_path


def open_cache(path: str | Path) -> zarr.Group:
    path = Path(path)
    if not path.exists():
        partial = path.with_name(path.name + ".partial")
        hint = f" (an unfinished build is in {partial}; rerun the cache rule to finish it)" if partial.exists() else ""
        raise FileNotFoundError(f"cache {path} does not exist{hint}")
    group = zarr.open_group(str(path), mode="r")
    if not group.attrs.get("complete"):
        raise CacheMismatchError(f"cache {path} is incomplete; rebuild it")
    return group


def check_cache(path: str | Path, expected: dict) -> zarr.Group:
    """Open a cache and compare its attributes with `expected`; raise naming every difference."""
    group = open_cache(path)
    attrs = dict(group.attrs)
    differences = [f"{key}: cache has {attrs.get(key)!r}, this run expects {value!r}"
                   for key, value in expected.items() if attrs.get(key) != value]
    if differences:
        raise CacheMismatchError(
            f"cache {path} was built from other inputs than this run uses:\n  " + "\n  ".join(differences)
            + "\nRebuild it (e.g. snakemake --forcerun on its cache rule) or point the config at the inputs it was built from.")
    return group


class CachedRows(Dataset):
    """Training reads: `dataset[row_indices]` gives a whole batch (latent posterior moments, DINOv2
    tokens, class ids) in the order asked for. Every row of every array is read as its own chunk with
    a basic (slice) selection, all of them concurrently on zarr's event loop, straight into the batch.
    (An orthogonal selection `array.oindex[rows]` reads the same chunks but copies each one out through
    numpy fancy indexing over all of the chunk's axes: ~6x slower for [256, 1024] token rows.)
    Arrays are opened lazily so each DataLoader worker holds its own handles."""

    def __init__(self, vae_path: str | Path, dino_path: str | Path, class_ids: np.ndarray):
        self.vae_path, self.dino_path = str(vae_path), str(dino_path)
        self.class_ids = np.asarray(class_ids, dtype=np.int64)
        self._arrays: dict | None = None

    def _open(self) -> dict:
        if self._arrays is None:
            vae, dino = zarr.open_group(self.vae_path, mode="r"), zarr.open_group(self.dino_path, mode="r")
            self._arrays = {"latent_mean": vae["mean"], "latent_std": vae["std"], "tokens": dino["tokens"]}
        return self._arrays

    def __len__(self) -> int:
        return len(self.class_ids)

    def __getitem__(self, rows) -> dict[str, torch.Tensor]:
        rows = np.asarray(rows, dtype=np.int64)
        arrays = self._open()
        out = {name: np.empty((len(rows), *array.shape[1:]), dtype=array.dtype) for name, array in arrays.items()}
        sync(_read_rows(arrays, rows, out))
        batch = {name: torch.from_numpy(values) for name, values in out.items()}
        batch["class_id"] = torch.from_numpy(self.class_ids[rows])
        batch["row"] = torch.from_numpy(rows)
        return batch


async def _read_rows(arrays: dict[str, zarr.Array], rows: np.ndarray, out: dict[str, np.ndarray]) -> None:
    """out[name][i] = arrays[name][rows[i]] for every array and row, at most zarr's configured number
    of reads in flight."""
    limit = asyncio.Semaphore(zarr.config.get("async.concurrency") or len(rows))

    async def read(name: str, i: int, row: int) -> None:
        async with limit:
            out[name][i] = (await arrays[name].async_array.getitem(slice(row, row + 1)))[0]

    await asyncio.gather(*(read(name, i, int(row)) for name in arrays for i, row in enumerate(rows)))


def valid_rows(*groups: zarr.Group) -> np.ndarray:
    """Rows every cache encoded successfully; the rest are skipped by training."""
    valid = np.logical_and.reduce([group["valid"][:] for group in groups])
    return np.flatnonzero(valid)
