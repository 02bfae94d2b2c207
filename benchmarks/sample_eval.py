"""Sampling throughput (images/s) and metric time.

    python benchmarks/sample_eval.py                          # smoke-scale models, CPU or GPU
    python benchmarks/sample_eval.py --scale full --steps 50  # random SD-1.5-shaped U-Net and VAE, 512 px (GPU)
    python benchmarks/sample_eval.py --inception-dir /models/inception   # time the real Inception metrics

`full` uses the real SD-1.5 U-Net and VAE configurations with random weights: the cost of real sampling.
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
from urepa.sample import decode, initial_noise, make_sampler, sample_latents
from urepa.sd15 import SD15_SCHEDULER_CONFIG, SD15_UNET_CONFIG, SD15_VAE_CONFIG


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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scale", choices=["smoke", "full"], default="smoke")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--sampler", default="dpmpp", choices=["ddim", "euler", "dpmpp"])
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[8])
    parser.add_argument("--batches", type=int, default=2, help="timed batches per batch size")
    parser.add_argument("--metric-images", type=int, default=256, help="images for the metric timing")
    parser.add_argument("--inception-dir", default=None, help="time clean-fid's Inception instead of the stand-in")
    args = parser.parse_args()
    device = torch.device(args.device)
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        unet, vae, scheduler_config, text_dim = build_models(args.scale, Path(tmp), device, dtype)
        scheduler = make_sampler(args.sampler, scheduler_config)
        size = unet.config.sample_size
        for batch in args.batch_sizes:
            cond = torch.randn(batch, 77, text_dim, device=device, dtype=dtype)
            noise = torch.stack([initial_noise(i, 0, (4, size, size)) for i in range(batch)]).to(device, dtype)
            timings = []
            for _ in range(args.batches + 1):  # the first batch warms up kernels and caches
                if device.type == "cuda":
                    torch.cuda.synchronize()
                start = time.perf_counter()
                decode(vae, sample_latents(unet, scheduler, cond, cond, noise, args.steps, 7.5, 0.0, 0.7))
                if device.type == "cuda":
                    torch.cuda.synchronize()
                timings.append(time.perf_counter() - start)
            per_batch = float(np.mean(timings[1:]))
            rows.append({"what": f"sample {args.sampler} {args.steps} steps, CFG in t/T<=0.7", "batch": batch,
                         "images/s": batch / per_batch, "s/batch": per_batch})

    kind = "inception" if args.inception_dir else "stand-in"
    network = feature_networks.build_feature_network(kind, args.inception_dir, device)
    image_size = 512 if args.scale == "full" else 128
    images = np.random.default_rng(0).integers(0, 256, (args.metric_images, image_size, image_size, 3), dtype=np.uint8)
    batches = [images[i:i + 64] for i in range(0, len(images), 64)]
    start = time.perf_counter()
    generated = metrics.extract_features(network, batches, description="features")
    extract_s = time.perf_counter() - start
    start = time.perf_counter()
    metrics.compute_metrics(generated, generated)
    metric_s = time.perf_counter() - start
    rows.append({"what": f"{kind} features of {args.metric_images} images", "images/s": args.metric_images / extract_s,
                 "s/batch": extract_s})
    rows.append({"what": "FID, sFID, KID, IS, precision/recall from features", "s/batch": metric_s})
    print(f"device: {device}, scale: {args.scale}")
    print(pd.DataFrame(rows).to_string(index=False, float_format=lambda v: f"{v:.3g}", na_rep=""))


if __name__ == "__main__":
    main()
