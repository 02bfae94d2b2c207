"""Cache-building throughput: images/s for the VAE-latent and DINOv2-token caches, prompts/s for the
CLIP-embedding cache, through the same `urepa.caches.build_*` calls the workflow's cache rules make.

By default the inputs are the smoke tier's, generated into a temporary folder with `urepa.generated` at the
sizes config/config.yaml gives the tier (image tree, tiny random SD-1.5 and DINOv2); pass
--imagenet-dir / --sd15-dir / --dinov2 to measure real inputs (e.g. on a GPU box with --tier tierA).
Device, batch size and workers default to the config's `device`, `cache.batch_size` and `num_workers`.

    python benchmarks/cache_throughput.py                       # smoke tier, config's device
    python benchmarks/cache_throughput.py --repeat 8 --batch-size 16 --workers 0
    python benchmarks/cache_throughput.py --tier tierA --imagenet-dir /data/ILSVRC \\
        --sd15-dir /models/sd15 --dinov2 /models/dinov2_vitl14_pretrain.pth --device cuda

"items/s" divides the items by the build call's wall time, which includes loading the model;
"excl. load" subtracts the time a separate (warm) load of the same model takes.
"""
from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from urepa import generated  # noqa: E402
from urepa.caches import build_clip_cache, build_dino_cache, build_vae_cache  # noqa: E402
from urepa.config import load_yaml, tier_settings  # noqa: E402
from urepa.runtime import resolve_device, set_threads, setup_logging  # noqa: E402
from urepa.subset import build_subset, list_classes  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", type=Path, default=REPO / "config" / "config.yaml",
                        help="workflow config giving the defaults below (default config/config.yaml)")
    parser.add_argument("--tier", default=None, help="tier whose sizes to use (default: the config's tier)")
    parser.add_argument("--device", default=None, help="auto | cpu | cuda | cuda:N (default: the config's device)")
    parser.add_argument("--batch-size", type=int, default=None, help="images per batch (default: cache.batch_size)")
    parser.add_argument("--workers", type=int, default=None, help="image-decoding workers (default: num_workers)")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads (default 2, as the cache rules)")
    parser.add_argument("--imagenet-dir", type=Path, default=None,
                        help="ILSVRC root (default: generate the smoke tree)")
    parser.add_argument("--sd15-dir", type=Path, default=None, help="SD-1.5 diffusers folder (default: tiny random)")
    parser.add_argument("--dinov2", type=Path, default=None, help="DINOv2 folder or .pth (default: tiny random)")
    parser.add_argument("--images-per-class", type=int, default=None,
                        help="subset size per class (default: the tier's images_per_class)")
    parser.add_argument("--repeat", type=int, default=4,
                        help="repeat the subset's rows this many times, for a steadier figure on small tiers "
                             "(default 4)")
    parser.add_argument("--clip-classes", type=int, default=1000,
                        help="class prompts to encode for the CLIP cache, plus the empty prompt (default 1000, "
                             "as ImageNet-1k; names cycle through the tree's class names)")
    parser.add_argument("--work-dir", type=Path, default=None,
                        help="where inputs and caches go (default: a temporary folder, removed afterwards)")
    parser.add_argument("--only", nargs="+", choices=["vae", "dino", "clip"], default=["vae", "dino", "clip"],
                        help="caches to build (default: all three)")
    parser.add_argument("--quiet", action="store_true", help="log warnings only (progress bars stay)")
    return parser.parse_args(argv)


def timed(fn, *args, **kwargs) -> float:
    start = time.perf_counter()
    fn(*args, **kwargs)
    return time.perf_counter() - start


def main(argv=None) -> None:
    args = parse_args(argv)
    setup_logging(level=30 if args.quiet else 20)
    config = load_yaml(args.config)
    tier_name = args.tier or config["tier"]
    tier = tier_settings(config, tier_name)
    device = resolve_device(args.device or config["device"])
    batch_size = args.batch_size or config["cache"]["batch_size"]
    workers = config["num_workers"] if args.workers is None else args.workers
    set_threads(args.threads)
    work = Path(tempfile.mkdtemp(prefix="urepa_cache_bench_")) if args.work_dir is None else args.work_dir
    work.mkdir(parents=True, exist_ok=True)
    seed = config.get("seed", 0)
    try:
        # Inputs: given paths, or the smoke tier's generated ones (at the tier's sizes).
        imagenet = args.imagenet_dir
        if imagenet is None:
            spec = {"classes": 4, "train_images": 24, **tier.get("generated", {}), "val_images": 0}
            imagenet = generated.make_imagenet_tree(work / "imagenet", seed=seed, **spec)
        sd15_dir = args.sd15_dir or generated.make_sd15(work / "sd15", tier["image_size"], seed=seed)
        dinov2 = args.dinov2 or generated.make_dinov2(work / "dinov2", seed=seed)

        table = build_subset(imagenet, args.images_per_class or tier["images_per_class"], seed)
        if args.repeat > 1:
            table = pd.concat([table] * args.repeat, ignore_index=True)
            table["id"] = [f"{image_id}_{n}" for n, image_id in enumerate(table["id"])]
        csv = work / "subset.csv"
        table.to_csv(csv, index=False)
        classes = list_classes(imagenet)
        names = [f"{classes['name'][i % len(classes)]} {i}" for i in range(args.clip_classes)]
        classes_csv = work / "classes.csv"
        pd.DataFrame({"class_id": range(len(names)), "synset": [f"n{i:08d}" for i in range(len(names))],
                      "name": names}).to_csv(classes_csv, index=False)

        from urepa.dinov2 import load_dinov2
        from urepa.sd15 import load_text_encoder, load_vae

        results = []
        cache_dir = work / "cache"
        shutil.rmtree(cache_dir, ignore_errors=True)
        if "vae" in args.only:
            load = timed(load_vae, sd15_dir, device)
            wall = timed(build_vae_cache, csv, cache_dir / "vae_latents.zarr", Path(sd15_dir) / "vae",
                         tier["image_size"], batch_size, workers, device)
            results.append(("VAE latents", f"{tier['image_size']} px", len(table), "images", wall, load))
        if "dino" in args.only:
            load = timed(load_dinov2, dinov2, device)
            wall = timed(build_dino_cache, csv, cache_dir / "dino_tokens.zarr", dinov2, tier["image_size"],
                         tier["dino_size"], batch_size, workers, device)
            results.append(("DINOv2 tokens", f"{tier['dino_size']} px", len(table), "images", wall, load))
        if "clip" in args.only:
            load = timed(load_text_encoder, sd15_dir, device)
            wall = timed(build_clip_cache, classes_csv, cache_dir / "clip_embeddings.zarr", sd15_dir, device)
            results.append(("CLIP embeddings", "77 tokens", len(names) + 1, "prompts", wall, load))

        print()
        print(f"cache-building throughput | tier {tier_name} | device {device} | batch {batch_size} | "
              f"workers {workers} | torch threads {torch.get_num_threads()}")
        source = "the smoke tier's generated " if args.work_dir is None and not args.imagenet_dir else ""
        print(f"inputs: {source}images ({len(table) // args.repeat} rows x {args.repeat}), "
              f"SD-1.5 {'tiny random' if args.sd15_dir is None else sd15_dir}, "
              f"DINOv2 {'tiny random' if args.dinov2 is None else dinov2}")
        header = (f"{'cache':<16} {'input':>9} {'items':>7} {'unit':>8} {'wall s':>8} {'load s':>7} {'items/s':>9} "
                  f"{'excl. load':>11}")
        print(header)
        print("-" * len(header))
        for name, size, items, unit, wall, load in results:
            print(f"{name:<16} {size:>9} {items:>7} {unit:>8} {wall:>8.2f} {load:>7.2f} {items / wall:>9.1f} "
                  f"{items / max(wall - load, 1e-9):>11.1f}")
    finally:
        if args.work_dir is None:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
