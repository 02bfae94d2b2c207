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
import inspect
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
    parser.add_argument("--full-size", action="store_true",
                        help="random encoders of the real shapes (SD-VAE, CLIP ViT-L/14 text, DINOv2-L) where no "
                             "folder is given; use with a tier of 512 px images and 224 px DINOv2, e.g. rehearsal")
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


def make_encoders(out_dir: Path, full_size: bool, image_size: int, seed: int = 0) -> tuple[Path, Path]:
    """Random encoders the cache rules load: an SD-1.5 folder with only vae/, text_encoder/ and tokenizer/ (the
    U-Net is not needed), and a DINOv2 folder; `full_size`: SD-VAE, CLIP ViT-L/14 text and DINOv2-L shapes."""
    from transformers import CLIPTextConfig, CLIPTextModel

    from urepa.sd15 import SD15_TEXT_ENCODER_CONFIG

    sd15 = out_dir / "sd15"
    torch.manual_seed(seed)
    generated.random_vae(image_size, full_size).save_pretrained(sd15 / "vae")
    tokenizer = generated.tiny_clip_tokenizer()
    tokenizer.save_pretrained(sd15 / "tokenizer")
    special = dict(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                   pad_token_id=tokenizer.pad_token_id)
    text = SD15_TEXT_ENCODER_CONFIG if full_size else dict(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        max_position_embeddings=77, projection_dim=32)
    CLIPTextModel(CLIPTextConfig(**text, **special)).save_pretrained(sd15 / "text_encoder")
    return sd15, generated.make_dinov2(out_dir / "dinov2", full_size, seed)


def peak_gib(device: torch.device) -> float | None:
    return torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None


def cache_records(csv: Path, classes_csv: Path, sd15_dir: Path, dinov2: Path, image_size: int, dino_size: int,
                  batch_size: int, workers: int, device: torch.device, only: list[str], cache_dir: Path) -> list[dict]:
    """Per cache of `only` ("vae", "dino", "clip"), one record: items/s of the `urepa.caches.build_*` call the rule
    makes (image decoding, encoding and writing; the model's load included) and excluding a separate warm load of
    the model, with the peak device memory of the build on CUDA."""
    from urepa.dinov2 import load_dinov2
    from urepa.sd15 import load_text_encoder, load_vae

    rows, prompts = len(pd.read_csv(csv)), len(pd.read_csv(classes_csv)) + 1
    # The CLIP rule, as this call, takes build_clip_cache's own prompt batch.
    clip_batch = inspect.signature(build_clip_cache).parameters["batch_size"].default
    builds = {
        "vae": ("VAE latents", f"{image_size} px", rows, "images", lambda: load_vae(sd15_dir, device),
                lambda: build_vae_cache(csv, cache_dir / "vae_latents.zarr", Path(sd15_dir) / "vae", image_size,
                                        batch_size, workers, device)),
        "dino": ("DINOv2 tokens", f"{dino_size} px", rows, "images", lambda: load_dinov2(dinov2, device),
                 lambda: build_dino_cache(csv, cache_dir / "dino_tokens.zarr", dinov2, image_size, dino_size,
                                          batch_size, workers, device)),
        "clip": ("CLIP embeddings", "77 tokens", prompts, "prompts", lambda: load_text_encoder(sd15_dir, device),
                 lambda: build_clip_cache(classes_csv, cache_dir / "clip_embeddings.zarr", sd15_dir, device)),
    }
    records = []
    for name in only:
        cache, size, items, unit, load, build = builds[name]
        load_s = timed(load)
        if device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(device)
        wall = timed(build)
        records.append({"cache": cache, "input": size, "items": items, "unit": unit,
                        "batch": clip_batch if name == "clip" else batch_size,
                        "wall s": wall, "load s": load_s, "items/s": items / wall,
                        "items/s excl. load": items / max(wall - load_s, 1e-9), "peak GiB": peak_gib(device)})
    return records


def write_inputs(work: Path, imagenet: Path, images_per_class: int, repeat: int, clip_classes: int,
                 seed: int) -> tuple[Path, Path]:
    """The subset CSV (its rows repeated `repeat` times) and a classes CSV of `clip_classes` prompts."""
    table = build_subset(imagenet, images_per_class, seed)
    if repeat > 1:
        table = pd.concat([table] * repeat, ignore_index=True)
        table["id"] = [f"{image_id}_{n}" for n, image_id in enumerate(table["id"])]
    csv = work / "subset.csv"
    table.to_csv(csv, index=False)
    classes = list_classes(imagenet)
    names = [f"{classes['name'][i % len(classes)]} {i}" for i in range(clip_classes)]
    classes_csv = work / "classes.csv"
    pd.DataFrame({"class_id": range(len(names)), "synset": [f"n{i:08d}" for i in range(len(names))],
                  "name": names}).to_csv(classes_csv, index=False)
    return csv, classes_csv


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
        sd15_dir, dinov2 = args.sd15_dir, args.dinov2
        if sd15_dir is None or dinov2 is None:
            made_sd15, made_dinov2 = make_encoders(work / "encoders", args.full_size, tier["image_size"], seed)
            sd15_dir, dinov2 = sd15_dir or made_sd15, dinov2 or made_dinov2
        csv, classes_csv = write_inputs(work, imagenet, args.images_per_class or tier["images_per_class"],
                                        args.repeat, args.clip_classes, seed)
        cache_dir = work / "cache"
        shutil.rmtree(cache_dir, ignore_errors=True)
        results = cache_records(csv, classes_csv, sd15_dir, dinov2, tier["image_size"], tier["dino_size"],
                                batch_size, workers, device, args.only, cache_dir)
        print()
        print(f"cache-building throughput | tier {tier_name} | device {device} | batch {batch_size} | "
              f"workers {workers} | torch threads {torch.get_num_threads()}")
        random = "full-size random" if args.full_size else "tiny random"
        print(f"inputs: {'generated ' if args.imagenet_dir is None else ''}images, SD-1.5 encoders "
              f"{random if args.sd15_dir is None else sd15_dir}, DINOv2 {random if args.dinov2 is None else dinov2}")
        print(pd.DataFrame(results).to_string(index=False, float_format=lambda v: f"{v:.3g}", na_rep=""))
    finally:
        if args.work_dir is None:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
