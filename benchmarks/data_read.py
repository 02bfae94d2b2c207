"""Training-shaped read throughput from zarr caches of the real tier's shapes.

Generates a VAE-latent cache (posterior mean and std, [N, 4, 64, 64] float16) and a DINOv2-token cache
([N, 256, 1024] float16) of random data with `urepa.rowstore.create_row_cache` -- the same layout,
chunking, sharding and compression the cache stage writes, a shard at a time as it does -- then reads random batches through
`urepa.rowstore.CachedRows` and a torch DataLoader driven by `urepa.batches.StepBatches`, exactly as
training does, for each number of DataLoader workers, and prints samples/s.

    python benchmarks/data_read.py                        # 2000 rows, batch 48, workers 0 1 2
    python benchmarks/data_read.py --rows 4000 --duration 20 --workers 2
    python benchmarks/data_read.py --cache-dir /scratch/bench --keep   # reuse generated caches
    python benchmarks/data_read.py --shard-rows 256                     # another shard size

Note: on a machine with enough RAM the generated caches (~0.6 MiB per row) sit in the page cache after
generation, so this measures decoding and assembly, not the disk. Drop caches (or use --rows larger than
RAM) to include the disk.
"""
from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import zarr
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from urepa.rowstore import SHARD_ROWS, CachedRows, create_row_cache, write_row_checksums  # noqa: E402
from urepa.batches import StepBatches  # noqa: E402

LATENT_SHAPE = (4, 64, 64)   # SD-1.5 VAE at 512 px
TOKEN_SHAPE = (256, 1024)    # DINOv2 ViT-L/14 at 224 px: 16x16 grid, dim 1024
TARGET = 500                 # samples/s with 2 workers on a 2-core machine (issue 2)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=2000, help="rows per cache (default 2000)")
    parser.add_argument("--batch-size", type=int, default=48, help="rows per training batch (default 48)")
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2],
                        help="DataLoader worker counts to measure (default 0 1 2)")
    parser.add_argument("--duration", type=float, default=10.0,
                        help="seconds of reading per worker count, after warm-up (default 10)")
    parser.add_argument("--warmup-batches", type=int, default=3,
                        help="batches read before timing starts (worker start-up, file handles; default 3)")
    parser.add_argument("--cache-dir", type=Path, default=None,
                        help="where to generate the caches (default: a temporary folder, removed afterwards)")
    parser.add_argument("--keep", action="store_true",
                        help="keep the generated caches, and reuse them when --cache-dir already holds them")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads in the main process (default 1, as a training process leaves "
                             "the CPU to the data workers)")
    parser.add_argument("--shard-rows", type=int, default=SHARD_ROWS,
                        help=f"rows per zarr shard (default {SHARD_ROWS}, as the cache stage)")
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args(argv)


ARRAYS = {"vae_latents.zarr": {"mean": (LATENT_SHAPE, "float16"), "std": (LATENT_SHAPE, "float16")},
          "dino_tokens.zarr": {"tokens": (TOKEN_SHAPE, "float16")}}


def generate(cache_dir: Path, rows: int, shard_rows: int, seed: int) -> None:
    """Write the two caches with random data shaped like real latents and unit-norm tokens, a whole shard of
    every array per write, as a cache build does."""
    rng = np.random.default_rng(seed)
    vae, dino = (create_row_cache(cache_dir / name, arrays, rows, shard_rows) for name, arrays in ARRAYS.items())
    block = 64  # rows drawn at a time: bounds the float32 temporaries
    for start in tqdm(range(0, rows, shard_rows), desc="generating caches", unit="shard", mininterval=1):
        stop = min(rows, start + shard_rows)
        shard = {name: np.empty((stop - start, *shape), dtype=np.float16)
                 for name, shape in (("mean", LATENT_SHAPE), ("std", LATENT_SHAPE), ("tokens", TOKEN_SHAPE))}
        for first in range(0, stop - start, block):
            n = min(block, stop - start - first)
            rows_drawn = slice(first, first + n)
            shard["mean"][rows_drawn] = rng.standard_normal((n, *LATENT_SHAPE), dtype=np.float32) * 5
            shard["std"][rows_drawn] = np.exp(rng.uniform(-6, -2, (n, *LATENT_SHAPE)))
            tokens = rng.standard_normal((n, *TOKEN_SHAPE), dtype=np.float32)
            shard["tokens"][rows_drawn] = tokens / np.linalg.norm(tokens, axis=-1, keepdims=True)
        vae["mean"][start:stop], vae["std"][start:stop] = shard["mean"], shard["std"]
        dino["tokens"][start:stop] = shard["tokens"]
        for group in (vae, dino):
            write_row_checksums(group, start, stop, shard)
    for group in (vae, dino):
        group.attrs.update({"complete": True, "benchmark": "random data, real-tier shapes"})


def reusable(cache_dir: Path, rows: int, shard_rows: int) -> bool:
    """Caches in `cache_dir` have `rows` rows and exactly the layout create_row_cache makes today
    (compared with a fresh, empty one: creating it writes metadata only)."""
    with tempfile.TemporaryDirectory() as probe:
        for name, arrays in ARRAYS.items():
            if not (cache_dir / name).is_dir():
                return False
            create_row_cache(Path(probe) / name, arrays, rows, shard_rows)
            for array in arrays:
                current, fresh = (root / name / array / "zarr.json" for root in (cache_dir, Path(probe)))
                if not current.is_file() or current.read_text() != fresh.read_text():
                    return False
    return True


def disk_size(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def file_count(path: Path) -> int:
    return sum(p.is_file() for p in path.rglob("*"))


def measure(dataset: CachedRows, rows: np.ndarray, batch_size: int, workers: int, duration: float,
            warmup: int, seed: int) -> dict:
    loader = DataLoader(dataset, sampler=StepBatches(rows, batch_size, seed), batch_size=None,
                        num_workers=workers, persistent_workers=False,
                        prefetch_factor=2 if workers > 0 else None)
    iterator = iter(loader)
    for _ in range(warmup):
        next(iterator)
    samples = batches = 0
    latencies = []
    start = last = time.perf_counter()
    with tqdm(desc=f"reading, {workers} worker(s)", unit="sample", leave=False, mininterval=1) as bar:
        while time.perf_counter() - start < duration:
            batch = next(iterator)
            now = time.perf_counter()
            latencies.append(now - last)
            last = now
            n = int(batch["tokens"].shape[0])
            samples += n
            batches += 1
            bar.update(n)
    elapsed = time.perf_counter() - start
    del iterator
    shapes = {k: (tuple(v.shape), str(v.dtype).replace("torch.", "")) for k, v in batch.items()}
    return {"workers": workers, "samples": samples, "batches": batches, "seconds": elapsed,
            "samples_per_s": samples / elapsed, "ms_per_batch_p50": 1000 * float(np.median(latencies)),
            "ms_per_batch_p95": 1000 * float(np.percentile(latencies, 95)), "shapes": shapes}


def main(argv=None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    temporary = args.cache_dir is None
    cache_dir = Path(tempfile.mkdtemp(prefix="urepa_read_bench_")) if temporary else args.cache_dir
    cache_dir.mkdir(parents=True, exist_ok=True)
    try:
        vae_path, dino_path = cache_dir / "vae_latents.zarr", cache_dir / "dino_tokens.zarr"
        if args.keep and reusable(cache_dir, args.rows, args.shard_rows):
            print(f"reusing the caches in {cache_dir}")
        else:
            start = time.perf_counter()
            generate(cache_dir, args.rows, args.shard_rows, args.seed)
            print(f"generated {args.rows} rows in {time.perf_counter() - start:.1f} s")
        tokens = zarr.open_array(str(dino_path / "tokens"), mode="r")
        mean = zarr.open_array(str(vae_path / "mean"), mode="r")
        print(f"caches in {cache_dir}: VAE {disk_size(vae_path) / 2**20:.0f} MiB, "
              f"DINO {disk_size(dino_path) / 2**20:.0f} MiB, {file_count(vae_path) + file_count(dino_path)} files"
              f"  | tokens chunks {tokens.chunks} shards {tokens.shards} compressors {tokens.compressors}"
              f"  | latent chunks {mean.chunks} shards {mean.shards}")
        class_ids = np.arange(args.rows) % 1000
        dataset = CachedRows(vae_path, dino_path, class_ids)
        rows = np.arange(args.rows)
        results = [measure(dataset, rows, args.batch_size, w, args.duration, args.warmup_batches, args.seed)
                   for w in args.workers]
        per_sample = (2 * np.prod(LATENT_SHAPE) + np.prod(TOKEN_SHAPE)) * 2
        print()
        print(f"training-shaped reads: batch {args.batch_size} random rows of {args.rows}, "
              f"latent mean+std {LATENT_SHAPE} + tokens {TOKEN_SHAPE} fp16 ({per_sample / 2**10:.0f} KiB/sample)")
        print(f"{'workers':>7}  {'samples/s':>10}  {'MiB/s':>8}  {'batches':>7}  {'ms/batch p50':>12}  {'p95':>7}")
        for r in results:
            print(f"{r['workers']:>7}  {r['samples_per_s']:>10.0f}  {r['samples_per_s'] * per_sample / 2**20:>8.0f}  "
                  f"{r['batches']:>7}  {r['ms_per_batch_p50']:>12.1f}  {r['ms_per_batch_p95']:>7.1f}")
        print("batch:", ", ".join(f"{k} {s} {d}" for k, (s, d) in results[-1]["shapes"].items()))
        for r in results:
            if r["workers"] == 2:
                verdict = "met" if r["samples_per_s"] >= TARGET else "NOT met"
                print(f"target >= {TARGET} samples/s with 2 workers: {verdict} ({r['samples_per_s']:.0f})")
    finally:
        if temporary:
            shutil.rmtree(cache_dir, ignore_errors=True)
        elif not args.keep:
            for name in ARRAYS:
                shutil.rmtree(cache_dir / name, ignore_errors=True)


if __name__ == "__main__":
    main()
