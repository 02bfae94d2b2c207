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
        unet_factory = lambda: UNet2DConditionModel(**SD15_UNET_CONFIG)  # noqa: E731
        scheduler = DDPMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                                  beta_schedule="scaled_linear")
        latent, tokens, text = (4, 64, 64), (256, 1024), (77, 768)
    return unet_factory, scheduler, latent, tokens, text


# The exported description's VAE entry: the benchmark trains on random latents, from no VAE on disk.
RANDOM_VAE = {"name": "random latents", "path": None, "fingerprint": None}
SD15_NORMALISATION = LatentNormalisation.from_config(SD15_VAE_CONFIG)


def measure(args, unet_factory, scheduler, latent, tokens, text, ablation: str, finetune: str, batch: int,
            workdir: Path) -> dict:
    from urepa.train import Trainer

    config = load_yaml(REPO / "config" / "config.yaml")
    settings = train_settings(config, "smoke" if args.scale == "smoke" else "tierA", ablation)
    settings.update(batch_size=batch, finetune=finetune, max_steps=10_000, learning_rate=1e-4,
                    gradient_checkpointing=args.gradient_checkpointing)
    if args.scale == "full":
        settings["projector_hidden"] = 2048
    rows = max(4 * batch, 64)
    classes = 1000 if args.scale == "full" else 4
    clip = np.random.default_rng(0).standard_normal((classes + 1, *text)).astype(np.float16)
    device = torch.device(args.device)
    torch.manual_seed(0)
    trainer = Trainer(unet_factory(), scheduler, MemoryRows(rows, latent, tokens, classes), np.arange(rows), clip,
                      classes, tokens[1], int(tokens[0] ** 0.5), SD15_NORMALISATION, RANDOM_VAE, settings,
                      workdir / f"run-{ablation}-{finetune}-{batch}", seed=0, device=device, num_workers=0,
                      time_phases=True, report_to="none")
    batches = iter(trainer.batches(0))
    for _ in range(args.warmup):
        trainer.step(next(batches))
    # FLOPs of one step (forward and backward), counted on a step outside the timed ones.
    with FlopCounterMode(display=False) as counter:
        trainer.step(next(batches))
    flops = counter.get_total_flops()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    trainer.timer.totals.clear()
    start = time.perf_counter()
    for _ in range(args.steps):
        with trainer.timer("data"):
            batch_rows = next(batches)
        trainer.step(batch_rows)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elapsed = time.perf_counter() - start
    step_time = elapsed / args.steps
    result = {"ablation": ablation, "finetune": finetune, "batch": batch, "it/s": 1 / step_time,
              "step ms": 1000 * step_time}
    result.update({f"{k} ms": 1000 * v / args.steps for k, v in trainer.timer.totals.items()})
    result["TFLOP/step"] = flops / 1e12
    result["achieved TFLOP/s"] = flops / step_time / 1e12
    if device.type == "cuda":
        result["peak GiB"] = torch.cuda.max_memory_allocated(device) / 2**30
        result["MFU %"] = 100 * result["achieved TFLOP/s"] / args.peak_tflops
    trainer.accelerator.free_memory()
    return result


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
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        parts = build_parts(args.scale, workdir)
        results = [measure(args, *parts, ablation, finetune, batch, workdir)
                   for finetune in args.finetune for batch in batch_sizes for ablation in ("baseline", "urepa")]
    table = pd.DataFrame(results)
    for (finetune, batch), group in table.groupby(["finetune", "batch"]):
        base = group.loc[group["ablation"] == "baseline", "step ms"].item()
        table.loc[group.index, "overhead vs baseline %"] = 100 * (group["step ms"] / base - 1)
    print(f"device: {args.device} ({torch.cuda.get_device_name() if args.device.startswith('cuda') else 'CPU'}), "
          f"scale: {args.scale}, {args.steps} timed steps after {args.warmup} warm-up")
    print(table.to_string(index=False, float_format=lambda v: f"{v:.3g}"))


if __name__ == "__main__":
    main()
