"""The end-to-end VAE tuning step (REPA-E on SD-1.5, rule tune_vae): time per pass (VAE, discriminator, U-Net),
it/s, images/s, peak memory, and the ratio to a train_unet step (U-REPA, LoRA) at the same batch.

    python benchmarks/vae_tune_step.py                          # smoke scale (tiny random models), CPU or GPU
    python benchmarks/vae_tune_step.py --scale full --batch-sizes 8 16 --gan      # GPU: SD-1.5's shapes, 512 px

`full` builds SD-1.5's VAE and U-Net configurations with random weights (the real shapes and cost), 512 px images,
DINOv2-L-shaped targets (256 tokens x 1024) and LPIPS on a random VGG16. Batches come from memory.
"""
from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd
import torch

# benchmarks/ is the script's folder
from train_step import MemoryRows, build_parts, free_device_memory, measure, timed_steps
from urepa.config import load_yaml, tune_settings, tune_unet_settings
from urepa.reconstruction import load_lpips
from urepa.sd15 import SD15_VAE_CONFIG
from urepa.vae_tuning import VaeTuner

REPO = Path(__file__).resolve().parents[1]


class MemoryImageRows(MemoryRows):
    """MemoryRows plus random images in [-1, 1] at the tier's square."""

    def __init__(self, rows: int, image_size: int, latent, tokens, classes: int):
        super().__init__(rows, latent, tokens, classes)
        generator = torch.Generator().manual_seed(1)
        self.images = torch.rand(rows, 3, image_size, image_size, generator=generator) * 2 - 1

    def __getitem__(self, rows):
        batch = super().__getitem__(rows)
        batch["image"] = self.images[batch["row"]]
        return batch


def build_vae(scale: str, workdir: Path):
    from diffusers import AutoencoderKL

    from urepa.vae import load_autoencoder

    if scale == "smoke":
        return lambda: load_autoencoder(workdir / "sd15" / "vae")  # the tiny SD-1.5 train_step.build_parts made
    return lambda: AutoencoderKL(**SD15_VAE_CONFIG)


def measure_tuning(parts, vae_factory, scale: str, device: torch.device, batch: int, workdir: Path, steps: int,
                   warmup: int, gan: bool, gradient_checkpointing: bool, speed: dict | None = None) -> dict:
    """One tuning-step record: it/s, images/s, the time per pass and, on CUDA, peak memory. `speed`: speed options
    (config `train`) over the config's."""
    unet_factory, scheduler, latent, tokens, text = parts
    config = load_yaml(REPO / "config" / "config.yaml")
    tier = "smoke" if scale == "smoke" else "tierA"
    tune = tune_settings(config, tier, "repae") | {"batch_size": batch, "max_steps": 10_000, "gan": gan,
                                                    "gradient_checkpointing": gradient_checkpointing}
    unet = tune_unet_settings(config, tier, "repae") | {"batch_size": batch, "max_steps": 10_000} | (speed or {})
    if scale == "full":
        unet["projector_hidden"] = 2048
    image_size = 128 if scale == "smoke" else 512
    rows, classes = max(4 * batch, 64), (4 if scale == "smoke" else 1000)
    clip = np.random.default_rng(0).standard_normal((classes + 1, *text)).astype(np.float16)
    lpips_model, _ = load_lpips(None, device)
    torch.manual_seed(0)
    reference = (np.zeros(latent[0]), np.full(latent[0], 25.0))
    tuner = VaeTuner(vae_factory().to(device), unet_factory(), scheduler,
                     MemoryImageRows(rows, image_size, latent, tokens, classes), np.arange(rows), clip, classes,
                     tokens[1], int(tokens[0] ** 0.5), reference, lpips_model, unet, tune,
                     workdir / f"tune-{batch}", seed=0, device=device, num_workers=0, vae_name="benchmark",
                     time_phases=True)
    try:
        batches = iter(tuner.batches(0))
        for _ in range(warmup):
            tuner.step(next(batches))
        step_time, phases, peak = timed_steps(tuner, batches, steps, device)
    finally:
        tuner.accelerator.free_memory()
        del tuner, lpips_model
        free_device_memory(device)
    result = {"stage": "tune_vae", "gan": gan, "batch": batch, "it/s": 1 / step_time, "images/s": batch / step_time,
              "step ms": 1000 * step_time}
    result.update({f"{k} ms": 1000 * v / steps for k, v in phases.items()})
    if peak is not None:
        result["peak GiB"] = peak
    return result


def tuning_records(parts, vae_factory, scale: str, device: torch.device, batch_sizes: list[int], workdir: Path,
                   steps: int, warmup: int, gan: bool, gradient_checkpointing: bool,
                   speed: dict | None = None) -> list[dict]:
    """Per batch size, the tuning step's record with its ratio to a train_unet step (U-REPA, LoRA) at that batch,
    both with the speed options `speed` over the config's."""
    rows = []
    for batch in batch_sizes:
        tuning = measure_tuning(parts, vae_factory, scale, device, batch, workdir, steps, warmup, gan,
                                gradient_checkpointing, speed)
        unet_step = measure(parts, scale, device, "urepa", "lora", batch, workdir, steps, warmup, peak_tflops=989.0,
                            speed=speed)
        tuning["train_unet step ms"] = unet_step["step ms"]
        tuning["ratio to train_unet"] = tuning["step ms"] / unet_step["step ms"]
        rows.append(tuning)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scale", choices=["smoke", "full"], default="smoke")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=None, help="default: 4 (smoke), 8 16 (full)")
    parser.add_argument("--steps", type=int, default=5, help="timed steps per configuration")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--gan", action="store_true", help="with the discriminator pass")
    parser.add_argument("--gradient-checkpointing", action=argparse.BooleanOptionalAction, default=True,
                        help="the VAE's (tune_vae's default)")
    args = parser.parse_args()
    batch_sizes = args.batch_sizes or ([4] if args.scale == "smoke" else [8, 16])
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        parts = build_parts(args.scale, workdir)
        rows = tuning_records(parts, build_vae(args.scale, workdir), args.scale, torch.device(args.device),
                              batch_sizes, workdir, args.steps, args.warmup, args.gan, args.gradient_checkpointing)
    print(f"device: {args.device} ({torch.cuda.get_device_name() if args.device.startswith('cuda') else 'CPU'}), "
          f"scale: {args.scale}, GAN {'on' if args.gan else 'off'}, {args.steps} timed steps after {args.warmup} "
          f"warm-up")
    print(pd.DataFrame(rows).to_string(index=False, float_format=lambda v: f"{v:.3g}"))

if __name__ == "__main__":
    main()
