"""The row store under every image cache: a zarr group of [rows, ...] arrays, row i for row i of the subset CSV,
built resumably from images by any encoder (`urepa.caches` holds the encoders), sealed, checked and read.

Every cache carries its metadata (encoder, fingerprint of its weights, shapes, preprocessing, CSV digest) in the
group's attributes; `check_cache` compares them with what a later stage expects and stops with a clear error.

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
import google_crc32c
import zarr
from filelock import FileLock
from torch.utils.data import DataLoader, Dataset
from zarr.codecs import Crc32cCodec
from zarr.core.sync import sync

from .config import check_shard_rows
from .digests import file_digest
from .images import open_rgb
from .runtime import disk_full_named, progress, provenance, set_aside

log = logging.getLogger(__name__)

# Rows per shard file of the image caches (config `cache.shard_rows`). At the real tiers' shapes a shard of
# DINOv2 tokens (256 x 1024 fp16, 512 KiB a row) is a 512 MiB file and one of latent moments (4 x 64 x 64
# fp16, 32 KiB a row) at most 32 MiB: tierB's 500k rows make 489 shards per array, ~1,500 files instead of
# ~1.5 million. Larger shards are not free: zarr-python reads a shard's index (16 bytes a row: 16 KiB here, half
# a latent row) with every row it reads from it, a part job holds one shard of every array in memory (~576 MiB
# here) before writing it, and a kill loses up to a shard's rows.
SHARD_ROWS = 1024
STORE = "store.zarr"      # inside a build folder: the store being filled, renamed into place when sealed
ROW_CHECKSUMS = "row_crc32c"  # [rows, arrays] CRC-32C of every row of every data array (attribute: their order)
NOT_DATA = ("valid", ROW_CHECKSUMS)
FINISHED = "finished"     # inside a build folder: one record per finished shard


class CacheMismatchError(RuntimeError):
    """A cache was built from other inputs than the ones this run uses."""


class CacheCorruptError(RuntimeError):
    """Bytes of a sealed cache are not the ones written: the message names cache, array, rows and shard file."""


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
        # without, machine under load), while zstd saved 10 % of random latents' bytes. A CRC-32C per row chunk
        # (zarr v3's crc32c codec): zarr-python and whole-shard reads check it.
        group.create_array(name, shape=(num_rows, *row_shape), chunks=(1, *row_shape), shards=(shard_rows, *row_shape),
                           dtype=dtype, fill_value=np.nan, compressors=[Crc32cCodec()])
    # The same CRC-32Cs again, one row of them per data row: zarrs (training's reader) does not check the codec's
    # on a read of single chunks out of a shard (zarrs 0.2.3), so CachedRows checks every row it reads against these
    # (~3 ms a batch of 48 DINOv2 rows). Chunked like the shards: part jobs write disjoint chunks.
    group.create_array(ROW_CHECKSUMS, shape=(num_rows, len(arrays)), chunks=(shard_rows, len(arrays)),
                       dtype="uint32", fill_value=0, compressors=None)
    group.attrs[ROW_CHECKSUMS] = list(arrays)
    return group


def write_row_checksums(group: zarr.Group, start: int, stop: int, values: dict[str, np.ndarray]) -> None:
    """Store the CRC-32Cs of rows start:stop of every data array (`values`: those rows, by array name)."""
    group[ROW_CHECKSUMS][start:stop] = np.stack([row_checksums(values[name]) for name in group.attrs[ROW_CHECKSUMS]],
                                                axis=1)


def row_checksums(rows: np.ndarray) -> np.ndarray:
    """CRC-32C of each row's bytes as stored (C order, native little-endian: what the crc32c codec checksums)."""
    return np.array([google_crc32c.value(np.ascontiguousarray(row).tobytes()) for row in rows], dtype=np.uint32)


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
        if ROW_CHECKSUMS not in group:
            return "was started by a version without row checksums"
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
    """Write one shard of every array whole, with its rows' checksums, then record it as finished."""
    with disk_full_named(folder / STORE / ROW_CHECKSUMS):
        write_row_checksums(group, start, stop, values)
    for name, rows in values.items():
        array = group[name]
        # A job killed while writing this shard may have left a torn file, which zarr would read (and reject for
        # its checksum) to merge the new rows into: start from no file.
        shard_key = array.metadata.encode_chunk_key((shard,) + (0,) * (array.ndim - 1))
        sync((array.store_path / shard_key).delete())
        with disk_full_named(folder / STORE / name / shard_key):
            array[start:stop] = rows
    record = folder / FINISHED / f"{shard:06d}.json"
    temporary = record.with_suffix(".tmp")
    temporary.write_text(json.dumps({"shard": shard, "rows": [start, stop], "build": build, "invalid": invalid,
                                     "provenance": made_by}))
    os.replace(temporary, record)  # last: a shard counts as finished only once its data is on disk


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
    names = sorted(name for name in group.array_keys() if name not in NOT_DATA)
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
    digests, damaged = scan_rows(folder / STORE, names, ranges, valid)
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


def scan_rows(store: Path, names: list[str], ranges: list[tuple[int, int]], valid: np.ndarray | None
              ) -> tuple[dict[str, str], dict[int, set[int]]]:
    """Read every shard of every array whole: the SHA-256 of each array's rows in row order, and per shard the
    rows that are not what was written: a CRC-32C that differs from the stored one, a shard file that fails its
    own checksums (all its rows), or (`valid` given) a valid row without finite values or an invalid one not NaN."""
    group = zarr.open_group(str(store), mode="r")
    checksums = group[ROW_CHECKSUMS][:] if ROW_CHECKSUMS in group else None
    columns = group.attrs.get(ROW_CHECKSUMS, [])
    digests, damaged = {}, {}
    for name, array in open_arrays(store, names).items():
        digest = hashlib.sha256()
        for shard, (start, stop) in enumerate(progress(ranges, desc=f"checking {name}", unit="shard", leave=False)):
            wrong = np.zeros(stop - start, dtype=bool)
            try:
                values = array[start:stop]
            except (RuntimeError, ValueError, OSError) as error:  # a row chunk's CRC (zarrs checks them on whole shards)
                log.warning("%s: %s; reading its rows one by one", shard_file(store, name, shard), error)
                try:  # zarrs does not check single chunks: the stored row checksums below find the bad ones
                    values = np.stack([array[row:row + 1][0] for row in range(start, stop)])
                except (RuntimeError, ValueError, OSError):  # a torn shard index: no row can be read
                    damaged.setdefault(shard, set()).update(range(start, stop))
                    continue
                wrong[:] = checksums is None or name not in columns
            rows = values.reshape(stop - start, -1)
            if checksums is not None and name in columns:
                wrong |= row_checksums(values) != checksums[start:stop, columns.index(name)]
            if valid is not None:
                expected = valid[start:stop]
                wrong |= expected & ~np.isfinite(rows).all(axis=1)
                wrong[~expected] |= ~np.isnan(rows[~expected]).all(axis=1)
            if wrong.any():
                damaged.setdefault(shard, set()).update((np.flatnonzero(wrong) + start).tolist())
            digest.update(values)  # C-ordered rows, without a copy
        digests[name] = digest.hexdigest()
    return digests, damaged


def shard_file(store: str | Path, name: str, shard: int) -> Path:
    """The file of shard `shard` of array `name` (zarr v3's default chunk key encoding: c/<shard>/0/...)."""
    array = zarr.open_array(str(Path(store) / name), mode="r")
    return Path(store) / name / array.metadata.encode_chunk_key((shard,) + (0,) * (array.ndim - 1))


def rebuild_hint(path: str | Path) -> str:
    rule = {"vae_latents": "cache_vae", "dino_tokens": "cache_dino", "clip_embeddings": "cache_clip"}
    kind = zarr.open_group(str(path), mode="r").attrs.get("cache", "")
    return (f"The cache must be rebuilt: delete {path} and run snakemake again, or run it with --forcerun "
            f"{rule.get(kind, 'on its cache rule')}")


def verify_cache(path: str | Path) -> None:
    """Read a sealed cache whole and check every row against its CRC-32C and every array against the SHA-256 the
    seal wrote (`data_sha256`); raise `CacheCorruptError` naming what differs. ~140 MiB/s: half an hour for tierB's
    DINOv2 tokens, seconds for the CLIP cache."""
    group = open_cache(path)
    expected = group.attrs.get("data_sha256")
    if not expected:
        raise CacheCorruptError(f"cache {path} records no data_sha256 to verify against: built by an older version. "
                                + rebuild_hint(path))
    names = sorted(expected)
    length = group[names[0]].shape[0]
    shard_rows = group[names[0]].shards[0] if group[names[0]].shards else length
    ranges = [shard_range(shard, shard_rows, length) for shard in range(math.ceil(length / shard_rows))]
    digests, damaged = scan_rows(Path(path), names, ranges, None)
    problems = [f"rows {_listed(sorted(rows))} of shard {shard} ({', '.join(str(shard_file(path, n, shard)) for n in names)})"
                " fail their checksums" for shard, rows in sorted(damaged.items())]
    problems += [f"array {name}'s SHA-256 is {digests[name]}, not the sealed {expected[name]}"
                 for name in names if digests[name] != expected[name]]
    if problems:
        raise CacheCorruptError(f"cache {path} is corrupt: " + "; ".join(problems) + ". " + rebuild_hint(path))
    log.info("verified %s: %s, %d rows, every checksum as sealed", path, ", ".join(names), length)


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


def check_cache(path: str | Path, expected: dict, verify: bool = False) -> zarr.Group:
    """Open a cache and compare its attributes with `expected`; raise naming every difference. `verify`: also read it
    whole against its checksums (`verify_cache`)."""
    group = open_cache(path)
    attrs = dict(group.attrs)
    differences = [f"{key}: cache has {attrs.get(key)!r}, this run expects {value!r}"
                   for key, value in expected.items() if attrs.get(key) != value]
    if differences:
        raise CacheMismatchError(
            f"cache {path} was built from other inputs than this run uses:\n  " + "\n  ".join(differences)
            + "\nRebuild it (e.g. snakemake --forcerun on its cache rule) or point the config at the inputs it was built from.")
    if verify:
        verify_cache(path)
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
            # Where each batch key lives (cache, array) and its rows' CRC-32Cs, all in memory (4 bytes a row).
            self._sources = {"latent_mean": (self.vae_path, "mean"), "latent_std": (self.vae_path, "std"),
                             "tokens": (self.dino_path, "tokens")}
            self._checksums = {}
            for key, (path, name) in self._sources.items():
                group = zarr.open_group(path, mode="r")
                columns = group.attrs.get(ROW_CHECKSUMS, [])
                if ROW_CHECKSUMS in group and name in columns:
                    self._checksums[key] = group[ROW_CHECKSUMS][:, columns.index(name)]
                else:
                    log.warning("cache %s has no row checksums (built by an older version): its rows are read "
                                "unchecked; rebuild it to have every read checked", path)
        return self._arrays

    def __len__(self) -> int:
        return len(self.class_ids)

    def __getitem__(self, rows) -> dict[str, torch.Tensor]:
        rows = np.asarray(rows, dtype=np.int64)
        arrays = self._open()
        out = {name: np.empty((len(rows), *array.shape[1:]), dtype=array.dtype) for name, array in arrays.items()}
        try:
            sync(_read_rows(arrays, rows, out))
        except (RuntimeError, ValueError, OSError) as error:  # e.g. a torn shard index ("Data corruption detected")
            raise CacheCorruptError(f"rows {_listed(sorted(set(rows.tolist())))} of {self.vae_path} and "
                                    f"{self.dino_path} could not be read ({error}); `snakemake verify_caches` names "
                                    f"the damaged shards") from error
        for key, checksums in self._checksums.items():
            wrong = row_checksums(out[key]) != checksums[rows]
            if wrong.any():
                path, name = self._sources[key]
                bad = sorted(set(rows[wrong].tolist()))
                shard_rows = arrays[key].shards[0]
                files = sorted({str(shard_file(path, name, row // shard_rows)) for row in bad})
                raise CacheCorruptError(f"cache {path}, array {name}: rows {_listed(bad)} do not match their "
                                        f"checksums (shard files {', '.join(files)}). " + rebuild_hint(path))
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
