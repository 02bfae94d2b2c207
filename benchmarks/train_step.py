"""Training-step time and its split (data, forward, alignment, backward, optimizer, EMA), U-REPA vs the
baseline, with it/s, peak memory and model FLOP utilisation.

    python benchmarks/train_step.py                       # smoke scale (tiny random SD-1.5), CPU or GPU
    python benchmarks/train_step.py --scale full --batch-sizes 48 64 --finetune lora full   # GPU

`full` builds the real SD-1.5 U-Net configuration with random weights (the real shapes and cost), 64x64
latents and DINOv2-L-shaped targets (256 tokens x 1024). Batches come from memory, so this measures the
step alone; benchmarks/data_read.py measures the cache reads that feed it.
"""
from __future__ import annotations

import argparse
import copy
import gc
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch.utils.flop_counter import FlopCounterMode

from urepa import generated
from urepa.config import load_yaml, train_settings
from urepa.sd15 import SD15_UNET_CONFIG, SD15_VAE_CONFIG
from urepa.vae import LatentNormalisation

REPO = Path(__file__).resolve().parents[1]


class MemoryRows:
    """Random cached rows held in memory, indexed like urepa.rowstore.CachedRows."""

    def __init__(self, rows: int, latent: tuple[int, ...], tokens: tuple[int, ...], classes: int):
        generator = torch.Generator().manual_seed(0)
        self.mean = torch.randn(rows, *latent, generator=generator).half()
        self.std = torch.full((rows, *latent), 0.05).half()
        self.tokens = torch.nn.functional.normalize(torch.randn(rows, *tokens, generator=generator), dim=-1).half()
        self.class_ids = torch.randint(0, classes, (rows,), generator=generator)

    def __getitem__(self, rows):
        rows = torch.as_tensor(rows)
        return {"latent_mean": self.mean[rows], "latent_std": self.std[rows], "tokens": self.tokens[rows],
                "class_id": self.class_ids[rows], "row": rows}


def build_parts(scale: str, workdir: Path):
    from diffusers import DDPMScheduler, UNet2DConditionModel

    from urepa.sd15 import load_noise_scheduler, load_unet

    if scale == "smoke":
        sd15 = generated.make_sd15(workdir / "sd15", image_size=128)
        unet_factory = lambda: load_unet(sd15)  # noqa: E731
        scheduler = load_noise_scheduler(sd15)
        latent, tokens, text = (4, 16, 16), (16, 64), (77, 32)
    else:
        # Drawn once and copied for each measurement, instead of drawing 860M random weights again each time.
        template = UNet2DConditionModel(**SD15_UNET_CONFIG)
        unet_factory = lambda: copy.deepcopy(template)  # noqa: E731
        scheduler = DDPMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                                  beta_schedule="scaled_linear")
        latent, tokens, text = (4, 64, 64), (256, 1024), (77, 768)
    return unet_factory, scheduler, latent, tokens, text


# The exported description's VAE entry: the benchmark trains on random latents, from no VAE on disk.
RANDOM_VAE = {"name": "random latents", "path": None, "fingerprint": None}
SD15_NORMALISATION = LatentNormalisation.from_config(SD15_VAE_CONFIG)


def free_device_memory(device: torch.device) -> None:
    """Give back what a finished (or failed: out of memory) measurement held, before the next one."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def timed_steps(runner, batches, steps: int, device: torch.device) -> tuple[float, dict[str, float], float | None]:
    """Seconds per step over `steps` steps of `runner` (a Trainer or a VaeTuner, built with time_phases) on the
    next batches of `batches`: with its phase totals (the batch reads charged to "data") and the peak GiB
    allocated on CUDA (None elsewhere)."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    runner.timer.totals.clear()
    start = time.perf_counter()
    for _ in range(steps):
        with runner.timer("data"):
            rows = next(batches)
        runner.step(rows)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    step_time = (time.perf_counter() - start) / steps
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
    return step_time, dict(runner.timer.totals), peak


def measure(parts, scale: str, device: torch.device, ablation: str, finetune: str, batch: int, workdir: Path,
            steps: int, warmup: int, peak_tflops: float, gradient_checkpointing: bool = False,
            speed: dict | None = None) -> dict:
    """One training-step record: it/s, images/s, the time per phase, FLOPs per step, achieved TFLOP/s and, on CUDA,
    peak memory and MFU against `peak_tflops`. `speed`: speed options (config `train`) over the config's."""
    from urepa.train import Trainer

    unet_factory, scheduler, latent, tokens, text = parts
    config = load_yaml(REPO / "config" / "config.yaml")
    settings = train_settings(config, "smoke" if scale == "smoke" else "tierA", ablation)
    settings.update(batch_size=batch, finetune=finetune, max_steps=10_000, learning_rate=1e-4,
                    gradient_checkpointing=gradient_checkpointing, **(speed or {}))
    if scale == "full":
        settings["projector_hidden"] = 2048
    rows = max(4 * batch, 64)
    classes = 1000 if scale == "full" else 4
    clip = np.random.default_rng(0).standard_normal((classes + 1, *text)).astype(np.float16)
    torch.manual_seed(0)
    trainer = Trainer(unet_factory(), scheduler, MemoryRows(rows, latent, tokens, classes), np.arange(rows), clip,
                      classes, tokens[1], int(tokens[0] ** 0.5), SD15_NORMALISATION, RANDOM_VAE, settings,
                      workdir / f"run-{ablation}-{finetune}-{batch}", seed=0, device=device, num_workers=0,
                      time_phases=True, report_to="none")
    try:
        batches = iter(trainer.batches(0))
        for _ in range(warmup):
            trainer.step(next(batches))
        # FLOPs of one step (forward and backward), counted on a step outside the timed ones.
        with FlopCounterMode(display=False) as counter:
            trainer.step(next(batches))
        flops = counter.get_total_flops()
        step_time, phases, peak = timed_steps(trainer, batches, steps, device)
    finally:
        trainer.accelerator.free_memory()
        del trainer
        free_device_memory(device)
    result = {"ablation": ablation, "finetune": finetune, "batch": batch, "it/s": 1 / step_time,
              "images/s": batch / step_time, "step ms": 1000 * step_time}
    result.update({f"{k} ms": 1000 * v / steps for k, v in phases.items()})
    result["TFLOP/step"] = flops / 1e12
    result["achieved TFLOP/s"] = flops / step_time / 1e12
    if peak is not None:
        result["peak GiB"] = peak
        result["MFU %"] = 100 * result["achieved TFLOP/s"] / peak_tflops
    return result


def with_overhead(records: list[dict]) -> list[dict]:
    """Each record with its step time over the baseline's at the same fine-tuning mode and batch (the alignment's
    cost, in %), where both were measured."""
    base = {(r["finetune"], r["batch"]): r["step ms"] for r in records if r["ablation"] == "baseline"}
    return [{**r, "overhead vs baseline %": 100 * (r["step ms"] / base[r["finetune"], r["batch"]] - 1)}
            if (r["finetune"], r["batch"]) in base else r for r in records]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scale", choices=["smoke", "full"], default="smoke")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=None, help="default: 8 (smoke), 48 64 (full)")
    parser.add_argument("--finetune", nargs="+", default=["lora"], choices=["lora", "partial", "full"])
    parser.add_argument("--steps", type=int, default=20, help="timed steps per configuration")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--gradient-checkpointing", action="store_true")
    parser.add_argument("--peak-tflops", type=float, default=989.0,
                        help="the GPU's dense bf16 peak for MFU (H100 SXM: 989; A100: 312)")
    args = parser.parse_args()
    batch_sizes = args.batch_sizes or ([8] if args.scale == "smoke" else [48, 64])
    device = torch.device(args.device)
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        parts = build_parts(args.scale, workdir)
        results = [measure(parts, args.scale, device, ablation, finetune, batch, workdir, args.steps, args.warmup,
                           args.peak_tflops, args.gradient_checkpointing)
                   for finetune in args.finetune for batch in batch_sizes for ablation in ("baseline", "urepa")]
    print(f"device: {args.device} ({torch.cuda.get_device_name() if args.device.startswith('cuda') else 'CPU'}), "
          f"scale: {args.scale}, {args.steps} timed steps after {args.warmup} warm-up")
    print(pd.DataFrame(with_overhead(results)).to_string(index=False, float_format=lambda v: f"{v:.3g}"))

if __name__ == "__main__":
    main()
