"""Stage 2: zarr caches of SD-VAE latents, DINOv2 patch tokens and CLIP prompt embeddings.

Row i of the latent and token caches is row i of the subset CSV. Every cache carries its metadata
(encoder, fingerprint of its weights, shapes, preprocessing, CSV digest) in the group's attributes;
`check_cache` compares them with what a later stage expects and stops with a clear error.

Layout: each array is stored with zarr v3 sharding, one chunk per row (the unit training reads at
random) and `shard_rows` rows per shard, one file each (see SHARD_ROWS).

Building is split into shards and resumable. A build lives in `<cache>.partial/`: the store being
filled (`store.zarr`) and a record per finished shard (`finished/<shard>.json`, with the shard's
invalid rows). A part job encodes a contiguous range of whole shards, holds each shard's rows in
memory, writes the shard whole, then records it; several part jobs fill disjoint shards of one build,
and a killed job started again encodes only the shards without a record. Sealing (`seal_cache`) checks
every row against the records, writes the valid mask, the error list and a digest of every array, and
renames the store into place. Snakemake deletes a rule's declared outputs before the job starts, so the
build folder is deliberately not an output.
"""
from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import math
import os
import shutil
from pathlib import Path
from typing import Callable

import numpy as np
import pandas as pd
import torch
import zarr
from filelock import FileLock
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from torchvision import transforms
from zarr.core.sync import sync

from .runtime import progress, provenance, set_aside

from .subset import prompt_for

log = logging.getLogger(__name__)

# Rows per shard file of the image caches (config `cache.shard_rows`). At the real tiers' shapes a shard of
# DINOv2 tokens (256 x 1024 fp16, 512 KiB a row) is a 512 MiB file and one of latent moments (4 x 64 x 64
# fp16, 32 KiB a row) at most 32 MiB: tierB's 500k rows make 489 shards per array, ~1,500 files instead of
# ~1.5 million. Larger shards are not free: zarr-python reads a shard's index (16 bytes a row: 16 KiB here, half
# a latent row) with every row it reads from it, a part job holds one shard of every array in memory (~576 MiB
# here) before writing it, and a kill loses up to a shard's rows.
SHARD_ROWS = 1024
STORE = "store.zarr"      # inside a build folder: the store being filled, renamed into place when sealed
FINISHED = "finished"     # inside a build folder: one record per finished shard


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
    invalid rows and why, the digest of every array's rows) and its valid-row mask. A cache rebuilt from
    damaged images differs here."""
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
    """Images of CSV rows, indexed by row. An unreadable image yields a zero tensor and the reason, so the
    batch goes on and the row is recorded as invalid (never written as if it were data)."""

    def __init__(self, paths: list[str], transform: Callable, shape: tuple[int, ...]):
        self.paths, self.transform, self.shape = paths, transform, shape

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, row: int):
        row = int(row)
        try:
            return row, self.transform(open_rgb(self.paths[row])), ""
        except Exception as error:  # corrupt, truncated, missing, unsupported or too small file
            return row, torch.zeros(self.shape), f"{type(error).__name__}: {error}"


def build_folder(out_path: str | Path) -> Path:
    """Where the cache at `out_path` is built before it is sealed."""
    out_path = Path(out_path)
    return out_path.with_name(out_path.name + ".partial")


def shard_range(shard: int, shard_rows: int, num_rows: int) -> tuple[int, int]:
    """First row and end row of one shard."""
    return shard * shard_rows, min(num_rows, (shard + 1) * shard_rows)


def part_shards(num_shards: int, part: int, parts: int) -> range:
    """The shards part `part` of `parts` encodes: contiguous, as even as whole shards allow, every shard in
    exactly one part."""
    if not 0 <= part < parts:
        raise ValueError(f"cache build part {part} does not exist: parts are numbered 0 to {parts - 1}")
    return range(part * num_shards // parts, (part + 1) * num_shards // parts)


def create_row_cache(path: str | Path, arrays: dict[str, tuple[tuple[int, ...], str]], num_rows: int,
                     shard_rows: int = SHARD_ROWS) -> zarr.Group:
    """A new, empty row cache at `path`: one [num_rows, *row_shape] array per entry of `arrays`, NaN until
    written. The one place the on-disk layout is decided; the data-read benchmark builds its real-tier-shaped
    caches with it too."""
    group = zarr.open_group(str(path), mode="w")
    for name, (row_shape, dtype) in arrays.items():
        # One row per chunk: training reads random rows. One shard per file: the unit a build writes. No
        # compression: unit-norm fp16 DINOv2 tokens are close to incompressible (zstd saves ~8 %), and
        # zarr-python decodes every compressed row in a thread of its own: ~30 % of a sharded training batch's
        # read CPU (benchmarks/data_read.py shapes: 129-139 ms a batch of 48 with zstd latents, 89-104 ms
        # without, machine under load), while zstd saved 10 % of random latents' bytes.
        group.create_array(name, shape=(num_rows, *row_shape), chunks=(1, *row_shape), shards=(shard_rows, *row_shape),
                           dtype=dtype, fill_value=np.nan, compressors=None)
    return group


def _open_build(folder: Path, arrays: dict[str, tuple[tuple[int, ...], str]], num_rows: int, shard_rows: int,
                attrs: dict) -> zarr.Group:
    """The store of an unfinished build from the same inputs and layout, or a new one; a build of anything else
    is set aside. Part jobs of one build start together: the lock lets one create the store, the others open it."""
    folder.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(folder) + ".lock"):
        if folder.exists():
            reason = _other_build(folder, arrays, shard_rows, attrs["build"])
            if reason is None:
                return zarr.open_group(str(folder / STORE), mode="r+")
            set_aside(folder, reason)
        (folder / FINISHED).mkdir(parents=True)
        group = create_row_cache(folder / STORE, arrays, num_rows, shard_rows)
        group.attrs.update({**attrs, "complete": False})  # last: a store without its build identity is set aside
        return group


def _other_build(folder: Path, arrays: dict, shard_rows: int, build: str) -> str | None:
    """Why the build in `folder` is not the one asked for, or None when it is."""
    try:
        group = zarr.open_group(str(folder / STORE), mode="r")
        if group.attrs.get("build") != build:
            return "was started from other inputs or settings"
        layouts = {name: group[name].shards[0] for name in arrays}
    except (FileNotFoundError, KeyError):  # killed while it was being created
        return "is an incompletely created build"
    if set(layouts.values()) != {shard_rows}:
        return f"is laid out in shards of {sorted(set(layouts.values()))} rows, not {shard_rows}"
    return None


def _finished_shards(folder: Path) -> dict[int, dict]:
    return {int(path.stem): json.loads(path.read_text()) for path in (folder / FINISHED).glob("*.json")}


def _write_shard(group: zarr.Group, folder: Path, shard: int, start: int, stop: int, values: dict[str, np.ndarray],
                 invalid: list[dict], build: str, made_by: dict) -> None:
    """Write one shard of every array whole, then record it as finished."""
    for name, rows in values.items():
        array = group[name]
        # A job killed while writing this shard may have left a torn file, which zarr would read (and reject for
        # its checksum) to merge the new rows into: start from no file.
        sync((array.store_path / array.metadata.encode_chunk_key((shard,) + (0,) * (array.ndim - 1))).delete())
        array[start:stop] = rows
    record = folder / FINISHED / f"{shard:06d}.json"
    temporary = record.with_suffix(".tmp")
    temporary.write_text(json.dumps({"shard": shard, "rows": [start, stop], "build": build, "invalid": invalid,
                                     "provenance": made_by}))
    os.replace(temporary, record)  # last: a shard counts as finished only once its data is on disk


def check_shard_rows(shard_rows: int, batch_size: int) -> None:
    """Batches must not span two shards, so that every row is encoded in the same batch whatever the shard size."""
    if shard_rows < 1 or shard_rows % batch_size:
        raise ValueError(f"cache.shard_rows ({shard_rows}) must be a positive multiple of cache.batch_size "
                         f"({batch_size}): batches must not span two shards")


def build_image_cache(csv_path: str | Path, out_path: str | Path, arrays: dict[str, tuple[tuple[int, ...], str]],
                      attrs: dict, transform: Callable, image_shape: tuple[int, ...],
                      encode: Callable[[torch.Tensor], dict[str, np.ndarray]], batch_size: int,
                      num_workers: int, desc: str, shard_rows: int = SHARD_ROWS,
                      part: tuple[int, int] | None = None, device: torch.device | str = "cpu") -> Path:
    """Encode every CSV row's image into `arrays` of a zarr group at `out_path`, resumably.

    `part=(k, n)`: encode only the k-th of n contiguous ranges of shards into the build folder and return it
    (`seal_cache` finishes the cache once all n parts are done); None: encode every shard, seal, and return
    `out_path`. Batches never span two shards and `shard_rows` is a multiple of `batch_size`, so every row is
    encoded in the same batch whatever the number of parts and shard size: the result is the same, bit for bit."""
    check_shard_rows(shard_rows, batch_size)
    csv_path, out_path = Path(csv_path), Path(out_path)
    table = pd.read_csv(csv_path)
    num_rows = len(table)
    # The batch size is part of the build: batched convolutions round differently (outputs differ by an LSB).
    attrs = {**attrs, "csv_sha256": file_digest(csv_path), "num_rows": num_rows, "batch_size": batch_size}
    attrs["build"] = build = hashlib.sha256(json.dumps(attrs, sort_keys=True).encode()).hexdigest()[:16]
    index, count = part or (0, 1)
    shards = part_shards(math.ceil(num_rows / shard_rows), index, count)
    folder = build_folder(out_path)
    group = _open_build(folder, arrays, num_rows, shard_rows, attrs)
    finished = _finished_shards(folder)
    todo = [shard for shard in shards if shard not in finished]
    ranges = {shard: shard_range(shard, shard_rows, num_rows) for shard in shards}
    done_rows = sum(stop - start for shard, (start, stop) in ranges.items() if shard in finished)
    part_rows = sum(stop - start for start, stop in ranges.values())
    where = f"{out_path.name} part {index + 1}/{count} (shards {shards.start}-{shards.stop - 1})" if part else out_path.name
    if done_rows:
        log.info("%s: resuming, %d of %d rows already done", where, done_rows, part_rows)
    batches = [np.arange(first, min(first + batch_size, stop))
               for shard in todo for start, stop in [ranges[shard]] for first in range(start, stop, batch_size)]
    loader = DataLoader(ImageRows(table["img_path"].tolist(), transform, image_shape), batch_sampler=batches,
                        num_workers=num_workers)
    made_by = provenance(device, batch_size=batch_size, num_workers=num_workers)
    shard = None
    for rows, images, problems in progress(loader, desc=desc, unit="batch"):
        rows = rows.numpy()
        if shard is None:  # the first batch of a shard
            shard = int(rows[0]) // shard_rows
            start, stop = ranges[shard]
            values = {name: np.full((stop - start, *row_shape), np.nan, dtype=dtype)
                      for name, (row_shape, dtype) in arrays.items()}
            invalid = []
        ok = np.array([not p for p in problems])
        for row, problem in zip(rows[~ok], np.array(problems)[~ok]):
            log.warning("row %d (%s) is invalid: %s", row, table["img_path"][row], problem)
            invalid.append({"row": int(row), "id": str(table["id"][row]), "path": table["img_path"][row],
                            "error": str(problem)})
        if ok.any():
            for name, encoded in encode(images[torch.from_numpy(ok)]).items():
                values[name][rows[ok] - start] = encoded
        if rows[-1] == stop - 1:
            _write_shard(group, folder, shard, start, stop, values, invalid, build, made_by)
            shard = None
    if part is not None:
        return folder
    return seal_cache(out_path)


class CacheBuildError(RuntimeError):
    """A cache build cannot be sealed: shards are missing or damaged."""


def seal_cache(out_path: str | Path) -> Path:
    """Finish the build of `out_path` once every part is done: check every row against the finished-shard
    records (a valid row holds finite values in every array, an invalid row none), write the valid mask, the
    invalid rows and a SHA-256 of every array's rows in row order, then rename the store into place.

    A shard found damaged (e.g. its file lost) loses its record, so that its part job encodes it again. Reading,
    checking and hashing ran at ~140 MiB/s of tokens here (2 cores under load): ~30 min for tierB's 250 GiB."""
    out_path = Path(out_path)
    folder = build_folder(out_path)
    if not (folder / STORE).is_dir():
        raise FileNotFoundError(f"no cache build to seal in {folder}: the cache's part jobs write it")
    group = zarr.open_group(str(folder / STORE), mode="r+")
    attrs = dict(group.attrs)
    names = sorted(name for name in group.array_keys() if name != "valid")
    num_rows, shard_rows = attrs["num_rows"], group[names[0]].shards[0]
    ranges = [shard_range(shard, shard_rows, num_rows) for shard in range(math.ceil(num_rows / shard_rows))]
    records = _finished_shards(folder)
    unfinished = [shard for shard in range(len(ranges)) if shard not in records]
    if unfinished:
        raise CacheBuildError(f"cannot seal {out_path}: {len(unfinished)} of {len(ranges)} shards of {folder} are "
                              f"not finished ({_listed(unfinished)}); run the cache's part jobs again")
    for shard, record in records.items():
        if record["build"] != attrs["build"] or tuple(record["rows"]) != ranges[shard]:
            raise CacheBuildError(f"shard {shard} of {folder} was recorded for build {record['build']} rows "
                                  f"{record['rows']}, not build {attrs['build']} rows {list(ranges[shard])}")
    errors = sorted((error for record in records.values() for error in record["invalid"]), key=lambda e: e["row"])
    valid = np.ones(num_rows, dtype=bool)
    valid[[error["row"] for error in errors]] = False
    digests, damaged = {}, {}
    for name, array in open_arrays(folder / STORE, names).items():
        digest = hashlib.sha256()
        for shard, (start, stop) in enumerate(ranges):
            values = array[start:stop]
            rows, expected = values.reshape(stop - start, -1), valid[start:stop]
            wrong = expected & ~np.isfinite(rows).all(axis=1)
            wrong[~expected] = ~np.isnan(rows[~expected]).all(axis=1)
            if wrong.any():
                damaged.setdefault(shard, set()).update((np.flatnonzero(wrong) + start).tolist())
            digest.update(values)  # C-ordered rows, without a copy
        digests[name] = digest.hexdigest()
    if damaged:
        for shard in damaged:
            (folder / FINISHED / f"{shard:06d}.json").unlink()
        rows = sorted(set().union(*damaged.values()))
        raise CacheBuildError(
            f"cannot seal {out_path}: {len(rows)} rows ({_listed(rows)}) do not hold what their shard records say "
            f"(a valid row finite values, an invalid row none); the records of shards {_listed(sorted(damaged))} are "
            f"removed so that the part jobs encode them again (snakemake --forcerun on the cache's part rule)")
    group.create_array("valid", data=valid, chunks=(num_rows,), overwrite=True)  # one file: sealing writes it alone
    # what set the last bits of each shard (threads, device, build of torch), one entry per distinct setting
    made_by = [json.loads(entry) for entry in sorted({json.dumps(r.get("provenance", {}), sort_keys=True)
                                                       for r in records.values()})]
    group.attrs.update({"errors": errors, "num_invalid": len(errors), "data_sha256": digests, "complete": True,
                        "provenance": made_by})
    if out_path.exists():
        shutil.rmtree(out_path)
    (folder / STORE).rename(out_path)
    shutil.rmtree(folder)
    Path(str(folder) + ".lock").unlink(missing_ok=True)  # every part is done: no job waits on it
    log.info("sealed %s: %d rows in %d shards, %d invalid", out_path, num_rows, len(ranges), len(errors))
    return out_path


def open_arrays(path: str | Path, names: list[str]) -> dict[str, zarr.Array]:
    """Arrays of a store, opened read-only with the zarrs (Rust) codec pipeline, which an array keeps. zarr-python's
    own pipeline spends ~2.5x the CPU of an unsharded read on each row it reads out of a shard: 2 DataLoader
    workers read 239 samples/s with it, 552 with zarrs (benchmarks/data_read.py, side by side, machine under
    load); whole shards read ~4x faster."""
    with zarr.config.set({"codec_pipeline.path": "zarrs.ZarrsCodecPipeline"}):
        group = zarr.open_group(str(path), mode="r")
        return {name: group[name] for name in names}


def _listed(items: list, shown: int = 10) -> str:
    return ", ".join(map(str, items[:shown])) + (f" and {len(items) - shown} more" if len(items) > shown else "")


def build_vae_cache(csv_path, out_path, sd15_dir, image_size: int, batch_size: int, num_workers: int,
                    device: torch.device, shard_rows: int = SHARD_ROWS, part: tuple[int, int] | None = None) -> Path:
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
                             batch_size, num_workers, "VAE latents", shard_rows, part, device)


def build_dino_cache(csv_path, out_path, dinov2_path, image_size: int, input_size: int, batch_size: int,
                     num_workers: int, device: torch.device, shard_rows: int = SHARD_ROWS,
                     part: tuple[int, int] | None = None) -> Path:
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
    a basic (slice) selection through the zarrs codec pipeline, all of them concurrently on zarr's event
    loop, straight into the batch.
    (An orthogonal selection `array.oindex[rows]` reads the same chunks but copies each one out through
    numpy fancy indexing over all of the chunk's axes: ~6x slower for [256, 1024] token rows.)
    Arrays are opened lazily so each DataLoader worker holds its own handles."""

    def __init__(self, vae_path: str | Path, dino_path: str | Path, class_ids: np.ndarray):
        self.vae_path, self.dino_path = str(vae_path), str(dino_path)
        self.class_ids = np.asarray(class_ids, dtype=np.int64)
        self._arrays: dict | None = None

    def _open(self) -> dict:
        if self._arrays is None:
            vae, dino = open_arrays(self.vae_path, ["mean", "std"]), open_arrays(self.dino_path, ["tokens"])
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
