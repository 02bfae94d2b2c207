"""Sampling throughput (images/s) and metric time.

    python benchmarks/sample_eval.py                          # smoke-scale models, CPU or GPU
    python benchmarks/sample_eval.py --scale full             # random SD-1.5-shaped U-Net and VAE, 512 px (GPU)
    python benchmarks/sample_eval.py --inception-dir /models/inception   # time the real Inception metrics

`full` uses the real SD-1.5 U-Net and VAE configurations with random weights: the cost of real sampling. Each
preset of config `sample.presets` is timed over a few steps with and without CFG and extrapolated to its own steps
(those in its guidance interval run the U-Net on the doubled batch), plus the decode.
"""
from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from urepa import feature_networks, generated, metrics
from urepa.config import load_yaml
from urepa.sample import decode, initial_noise, make_sampler, sample_latents
from urepa.sd15 import SD15_SCHEDULER_CONFIG, SD15_UNET_CONFIG, SD15_VAE_CONFIG

REPO = Path(__file__).resolve().parents[1]


def build_models(scale: str, workdir: Path, device: torch.device, dtype: torch.dtype):
    from diffusers import AutoencoderKL, PNDMScheduler, UNet2DConditionModel

    from urepa.sd15 import load_unet, load_vae

    if scale == "smoke":
        sd15 = generated.make_sd15(workdir / "sd15", image_size=128)
        unet, vae, text_dim = load_unet(sd15), load_vae(sd15), 32
    else:
        unet, vae, text_dim = UNet2DConditionModel(**SD15_UNET_CONFIG), AutoencoderKL(**SD15_VAE_CONFIG), 768
    scheduler_config = PNDMScheduler.from_config(SD15_SCHEDULER_CONFIG).config
    return unet.to(device, dtype).eval(), vae.to(device, dtype).eval(), scheduler_config, text_dim


def synchronised_seconds(device: torch.device, fn, *args) -> float:
    """Wall time of fn(*args), the device's queued work included."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    fn(*args)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start


def guided_steps(preset: dict, scheduler_config) -> int:
    """How many of the preset's steps fall in its guidance interval (those run the U-Net on the doubled batch)."""
    scheduler = make_sampler(preset["sampler"], scheduler_config)
    scheduler.set_timesteps(preset["steps"])
    num_train = scheduler.config.num_train_timesteps
    return sum(preset["guidance_low"] <= float(t) / num_train <= preset["guidance_high"] for t in scheduler.timesteps)


def sampling_records(unet, vae, scheduler_config, text_dim: int, device: torch.device, presets: dict[str, dict],
                     batch: int, timed_steps: int) -> list[dict]:
    """images/s of each sampling preset ({name: {sampler, steps, cfg_scale, guidance_low, guidance_high}}) at
    `batch`: `timed_steps` steps timed with CFG (the U-Net on the doubled batch) and without, after one warm-up
    call each, extrapolated to the preset's guided and unguided steps, plus the VAE decode of the batch."""
    dtype = unet.dtype
    cond = torch.randn(batch, 77, text_dim, device=device, dtype=dtype)
    size = unet.config.sample_size
    noise = torch.stack([initial_noise(i, 0, (4, size, size)) for i in range(batch)]).to(device, dtype)
    records = []
    for name, preset in presets.items():
        scheduler = make_sampler(preset["sampler"], scheduler_config)
        per_step = {}
        for guided, cfg_scale in (("guided", preset["cfg_scale"]), ("unguided", 1.0)):
            def run():
                return sample_latents(unet, scheduler, cond, cond, noise, timed_steps, cfg_scale, 0.0, 1.0)
            run()  # warms up kernels and caches
            per_step[guided] = synchronised_seconds(device, run) / timed_steps
        latents = sample_latents(unet, scheduler, cond, cond, noise, 1, 1.0, 0.0, 1.0)
        decode(vae, latents)
        decode_s = synchronised_seconds(device, decode, vae, latents)
        inside = guided_steps(preset, scheduler_config)
        per_batch = inside * per_step["guided"] + (preset["steps"] - inside) * per_step["unguided"] + decode_s
        records.append({"preset": name, "sampler": preset["sampler"], "steps": preset["steps"],
                        "guided steps": inside, "batch": batch, "images/s": batch / per_batch, "s/batch": per_batch,
                        "guided step ms": 1000 * per_step["guided"], "unguided step ms": 1000 * per_step["unguided"],
                        "decode ms": 1000 * decode_s, "timed steps": timed_steps})
    return records


def feature_records(kind: str, weights_dir, device: torch.device, image_size: int, images: int,
                    batch: int = 64) -> list[dict]:
    """images/s of the FID feature network `kind` on random `image_size` px images, and the time of the metrics
    (FID, sFID, KID, IS, precision/recall) from those features."""
    network = feature_networks.build_feature_network(kind, weights_dir, device)
    pixels = np.random.default_rng(0).integers(0, 256, (images, image_size, image_size, 3), dtype=np.uint8)
    batches = [pixels[i:i + batch] for i in range(0, images, batch)]
    metrics.extract_features(network, batches[:1], description="warm-up")
    start = time.perf_counter()
    features = metrics.extract_features(network, batches, description="features")
    extract_s = time.perf_counter() - start
    start = time.perf_counter()
    metrics.compute_metrics(features, features)
    metric_s = time.perf_counter() - start
    return [{"what": f"{kind} features, {image_size} px", "images": images, "batch": batch,
             "images/s": images / extract_s, "s": extract_s},
            {"what": "FID, sFID, KID, IS, precision/recall from features", "images": images, "s": metric_s}]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scale", choices=["smoke", "full"], default="smoke")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--presets", nargs="+", default=["fast", "full"], help="config sample.presets names")
    parser.add_argument("--timed-steps", type=int, default=3, help="steps timed per preset, with and without CFG")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=None, help="default: config sample.batch_size")
    parser.add_argument("--metric-images", type=int, default=256, help="images for the metric timing")
    parser.add_argument("--inception-dir", default=None, help="time clean-fid's Inception instead of the stand-in")
    args = parser.parse_args()
    device = torch.device(args.device)
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    sample = load_yaml(REPO / "config" / "config.yaml")["sample"]
    presets = {name: sample["presets"][name] for name in args.presets}
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        unet, vae, scheduler_config, text_dim = build_models(args.scale, Path(tmp), device, dtype)
        for batch in args.batch_sizes or [sample["batch_size"]]:
            rows += sampling_records(unet, vae, scheduler_config, text_dim, device, presets, batch, args.timed_steps)
    kind = "inception" if args.inception_dir else "stand-in"
    image_size = 512 if args.scale == "full" else 128
    rows += feature_records(kind, args.inception_dir, device, image_size, args.metric_images)
    print(f"device: {device}, scale: {args.scale}")
    print(pd.DataFrame(rows).to_string(index=False, float_format=lambda v: f"{v:.3g}", na_rep=""))


if __name__ == "__main__":
    main()
