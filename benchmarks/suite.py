"""Every throughput figure of the workflow from one command, for the few minutes a GPU is lent:

    python benchmarks/suite.py --scale full           # on the GPU: ~8 minutes, SD-1.5's real shapes, random weights
    python benchmarks/suite.py --scale smoke          # anywhere: the same sections on the tiny models (CPU: a minute)

Sections, each with its share of the time budget (--minutes, default 8) and isolated from the others (an error,
e.g. CUDA out of memory or a compile failure, is recorded and the next section runs):

    train          the training step (benchmarks/train_step.py): LoRA and partial, batch 48 and 64, urepa and
                   baseline: it/s, images/s, peak memory, FLOPs per step, MFU, the alignment's overhead in %
    speed          the LoRA urepa step at batch 48 with each speed option (config `train`) flipped from its default
    largest_batch  the largest LoRA urepa batch that fits, by doubling from 64 until CUDA runs out of memory, then
                   bisecting (multiples of 8), one step each; its it/s
    caches         the cache builds (benchmarks/cache_throughput.py): SD-VAE encode at 512 px, DINOv2-L at 224, CLIP
                   text, at config `cache.batch_size`: items/s, peak memory
    sampling       images/s of the `fast` and `full` presets with CFG at `sample.batch_size`
                   (benchmarks/sample_eval.py: a few steps timed, the rest extrapolated per step)
    features       Inception-v3 features for FID: images/s at `evaluate.batch_size`
    vae_tune       the end-to-end VAE tuning step (REPA-E, benchmarks/vae_tune_step.py) at `vae_tune.batch_size`,
                   with the speed options as configured and with all of them off

Within a section, a measurement that would not finish inside the section's time (judged by the longest one so far)
is not started: it is listed under the section's `skipped`. The JSON (--out, default
results/benchmarks/suite-<scale>-<device>-<time>.json) is rewritten after every section, so a killed run keeps what
it measured. At the end one table is printed: a row per measurement.

Reading the table: `it/s` and `images/s` are steady-state (after warm-up steps); `MFU %` is the model FLOPs of a
step (torch.utils.flop_counter, forward and backward) per second over the GPU's dense bf16 peak (--peak-tflops;
H100 SXM 989, A100 312); `overhead %` is a urepa step's time over the baseline's at the same mode and batch.
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
import traceback
from pathlib import Path

import pandas as pd
import torch

BENCHMARKS = Path(__file__).resolve().parent
REPO = BENCHMARKS.parent
sys.path[:0] = [str(REPO), str(BENCHMARKS)]
from cache_throughput import cache_records, make_encoders, write_inputs  # noqa: E402
from sample_eval import build_models, feature_records, sampling_records  # noqa: E402
from train_step import build_parts, free_device_memory, measure, with_overhead  # noqa: E402
from vae_tune_step import build_vae, tuning_records  # noqa: E402

from urepa import generated  # noqa: E402
from urepa.config import SPEED_KEYS, load_yaml, tier_settings, train_settings, tune_settings  # noqa: E402

# Each section's share of the budget: the training step is what the seed plan's figures are about.
SHARES = {"train": 0.30, "speed": 0.20, "largest_batch": 0.12, "caches": 0.09, "sampling": 0.10, "features": 0.04,
          "vae_tune": 0.10}
# Per scale: timed steps and warm-up steps of a training measurement, the batches, the sampling steps timed.
SCALES = {
    "full": {"steps": 10, "warmup": 3, "batches": [48, 64], "speed_batch": 48, "start_batch": 64, "max_batch": 1024,
             "sample_steps": 3, "feature_images": 512, "workers": 8, "tier": "tierA"},
    "smoke": {"steps": 2, "warmup": 1, "batches": [4, 8], "speed_batch": 4, "start_batch": 8, "max_batch": 16,
              "sample_steps": 2, "feature_images": 8, "workers": 0, "tier": "smoke"},
}
PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0}  # dense bf16, SXM


class OutOfTime(Exception):
    """A measurement not started: the section's time would not have held it."""


class Section:
    """One section's records, errors and skipped measurements, against its deadline."""

    def __init__(self, name: str, budget_s: float):
        self.name, self.budget_s = name, budget_s
        self.deadline = time.perf_counter() + budget_s
        self.records, self.skipped, self.longest = [], [], 0.0

    def left(self) -> float:
        return self.deadline - time.perf_counter()

    def measure(self, what: str, fn, *args, **kwargs):
        """fn's record(s), labelled `what`; an error is recorded as the measurement's record (and returned as None);
        OutOfTime where the longest measurement so far would not fit in what is left."""
        if self.left() <= self.longest:
            self.skipped.append(what)
            raise OutOfTime(what)
        start = time.perf_counter()
        try:
            result = fn(*args, **kwargs)
        except Exception as error:  # noqa: BLE001 -- recorded, and the suite goes on
            self.records.append({"what": what, "error": f"{type(error).__name__}: {error}"})
            result = None
        self.longest = max(self.longest, time.perf_counter() - start)
        for record in result if isinstance(result, list) else [result] if result else []:
            self.records.append({"what": what, **record})
        return result

    def each(self, items: list[tuple[str, callable]]) -> None:
        """Measure each (what, fn) in turn; those that no longer fit are listed as skipped."""
        for n, (what, fn) in enumerate(items):
            try:
                self.measure(what, fn)
            except OutOfTime:
                self.skipped += [later for later, _ in items[n + 1:]]
                return


class Suite:
    def __init__(self, args: argparse.Namespace):
        self.args, self.scale = args, SCALES[args.scale]
        self.device = torch.device(args.device)
        self.config = load_yaml(REPO / "config" / "config.yaml")
        self.workdir = Path(tempfile.mkdtemp(prefix="urepa_suite_"))
        self.parts = None
        name = torch.cuda.get_device_name(self.device) if self.device.type == "cuda" else "CPU"
        self.peak_tflops = args.peak_tflops or next((v for k, v in PEAK_TFLOPS.items() if k in name), None)
        self.report = {"scale": args.scale, "device": str(self.device), "device_name": name,
                       "torch": torch.__version__, "cuda": torch.version.cuda, "peak_tflops": self.peak_tflops,
                       "minutes": args.minutes, "started": time.strftime("%Y-%m-%d %H:%M:%S"), "sections": {}}

    # -- the sections --------------------------------------------------------------------------------------------
    def training_parts(self):
        if self.parts is None:
            self.parts = build_parts(self.args.scale, self.workdir)
        return self.parts

    def step(self, ablation: str, finetune: str, batch: int, speed: dict | None = None, steps: int | None = None,
             warmup: int | None = None):
        return lambda: measure(self.training_parts(), self.args.scale, self.device, ablation, finetune, batch,
                               self.workdir, steps or self.scale["steps"], warmup or self.scale["warmup"],
                               self.peak_tflops or float("nan"), speed=speed)

    def train(self, section: Section) -> None:
        self.training_parts()  # built before the first measurement, which would otherwise be charged for it
        section.each([(f"{finetune} {ablation} batch {batch}", self.step(ablation, finetune, batch))
                      for finetune in ("lora", "partial") for batch in self.scale["batches"]
                      for ablation in ("baseline", "urepa")])
        measured = iter(with_overhead([r for r in section.records if "error" not in r]))
        section.records = [r if "error" in r else next(measured) for r in section.records]

    def speed(self, section: Section) -> None:
        defaults = {key: train_settings(self.config, self.scale["tier"], "urepa")[key] for key in SPEED_KEYS}
        batch = self.scale["speed_batch"]
        items = [(f"lora urepa batch {batch}, speed options as configured", self.step("urepa", "lora", batch))]
        for key in SPEED_KEYS:
            what = f"lora urepa batch {batch}, {key} {'off' if defaults[key] else 'on'}"
            if key in self.args.skip_options:
                section.records.append({"what": what, "note": "not timed: --skip-options"})
                continue
            items.append((what, self.step("urepa", "lora", batch, {**defaults, key: not defaults[key]})))
        section.each(items)

    def largest_batch(self, section: Section) -> None:
        """Doubling from start_batch until out of memory (or max_batch), then bisection in multiples of 8."""
        fits, fails, finished = None, None, True
        batch = self.scale["start_batch"]
        try:
            while batch <= self.scale["max_batch"] and fails is None:
                fits, fails = self._try_batch(section, batch, fits, fails)
                batch *= 2
            while fits is not None and fails is not None and fails - fits > 8:
                fits, fails = self._try_batch(section, (fits + fails) // 16 * 8, fits, fails)
        except OutOfTime:
            finished = False
        section.records.append({"what": "largest LoRA urepa batch that fits", "batch": fits,
                                "first that does not": fails, "search finished": finished,
                                "searched up to": self.scale["max_batch"] if fails is None else None})

    def _try_batch(self, section: Section, batch: int, fits, fails):
        result = section.measure(f"lora urepa batch {batch} (search)", self.step("urepa", "lora", batch, steps=1,
                                                                                   warmup=1))
        if result is not None:
            return batch, fails
        error = section.records[-1]["error"]
        if "OutOfMemoryError" not in error:
            raise RuntimeError(f"batch {batch} failed for another reason than memory: {error}")
        section.records.pop()
        section.records.append({"what": f"lora urepa batch {batch} (search)", "batch": batch,
                                "error": "out of memory"})
        return fits, batch

    def caches(self, section: Section) -> None:
        tier = tier_settings(self.config, self.scale["tier"])
        full = self.args.scale == "full"
        image_size, dino_size = tier["image_size"], tier["dino_size"]
        batch = {**self.config["cache"], **tier.get("cache", {})}["batch_size"]
        work = self.workdir / "caches"
        # Two batches' worth of images of ImageNet-like sides (decoded, resized, cropped as in the cache rules).
        sides = {"image_sides": (540, 700)} if full else {}
        imagenet = generated.make_imagenet_tree(work / "imagenet", classes=4, train_images=batch // 2, val_images=0,
                                                **sides)
        sd15, dinov2 = make_encoders(work / "encoders", full, image_size)
        csv, classes_csv = write_inputs(work, imagenet, batch // 2, repeat=1, clip_classes=1000 if full else 16,
                                        seed=0)
        section.each([(name, lambda name=name: cache_records(csv, classes_csv, sd15, dinov2, image_size, dino_size,
                                                             batch, self.scale["workers"], self.device, [name],
                                                             work / "cache"))
                      for name in ("vae", "dino", "clip")])

    def sampling(self, section: Section) -> None:
        dtype = torch.float16 if self.device.type == "cuda" else torch.float32
        unet, vae, scheduler_config, text_dim = build_models(self.args.scale, self.workdir / "sampling", self.device,
                                                             dtype)
        presets = self.config["sample"]["presets"]
        section.each([(f"sample {name}", lambda name=name: sampling_records(
            unet, vae, scheduler_config, text_dim, self.device, {name: presets[name]},
            self.config["sample"]["batch_size"], self.scale["sample_steps"])) for name in ("fast", "full")])

    def features(self, section: Section) -> None:
        # The tier's own FID network: Inception at full scale; the smoke tier's stand-in, whose metrics take
        # seconds where 2048-feature matrix roots take minutes on a CPU.
        kind = tier_settings(self.config, self.scale["tier"])["feature_network"]
        weights = generated.make_inception(self.workdir / "inception") if kind == "inception" else None
        image_size = 512 if self.args.scale == "full" else 128
        section.each([(f"{kind} features", lambda: feature_records(
            kind, weights, self.device, image_size, self.scale["feature_images"],
            self.config["evaluate"]["batch_size"]))])

    def vae_tune(self, section: Section) -> None:
        tier = self.scale["tier"]
        tune = tune_settings(self.config, tier, "repae")
        batch, off = tune["batch_size"], {key: False for key in SPEED_KEYS}
        section.each([(f"tune_vae batch {batch}, speed options {label}", lambda speed=speed: tuning_records(
            self.training_parts(), build_vae(self.args.scale, self.workdir), self.args.scale, self.device, [batch],
            self.workdir, self.scale["steps"], self.scale["warmup"], tune["gan"], tune["gradient_checkpointing"],
            speed)) for label, speed in (("as configured", None), ("off", off))])

    # -- running and reporting -------------------------------------------------------------------------------------
    def run(self) -> dict:
        total = 60 * self.args.minutes
        for name in self.args.sections:
            section = Section(name, SHARES[name] * total)
            start = time.perf_counter()
            try:
                getattr(self, name)(section)
                error = None
            except Exception as failure:  # noqa: BLE001 -- recorded; the next section runs
                error = f"{type(failure).__name__}: {failure}"
                traceback.print_exc()
            free_device_memory(self.device)
            self.report["sections"][name] = {"budget s": round(section.budget_s, 1),
                                             "wall s": round(time.perf_counter() - start, 1),
                                             "error": error, "skipped": section.skipped, "records": section.records}
            status = f"error: {error}" if error else f"{len(section.records)} records"
            print(f"[suite] {name}: {status}, {time.perf_counter() - start:.0f} s of {section.budget_s:.0f} s"
                  + (f"; skipped for lack of time: {', '.join(section.skipped)}" if section.skipped else ""),
                  flush=True)
            self.write()
        return self.report

    def write(self) -> None:
        self.args.out.parent.mkdir(parents=True, exist_ok=True)
        self.args.out.write_text(json.dumps(self.report, indent=2, default=str))


COLUMNS = ["section", "what", "batch", "it/s", "images/s", "items/s", "peak GiB", "TFLOP/step", "MFU %",
           "overhead vs baseline %", "error", "note"]


def table(report: dict) -> pd.DataFrame:
    """One row per measurement (and per section error or skipped measurement), the suite's figures as columns."""
    rows = []
    for name, section in report["sections"].items():
        rows += [{"section": name, **record} for record in section["records"]]
        if section["error"]:
            rows.append({"section": name, "what": "(section)", "error": section["error"]})
        rows += [{"section": name, "what": what, "error": "skipped: no time left"} for what in section["skipped"]]
    frame = pd.DataFrame(rows)
    return frame[[c for c in COLUMNS if c in frame.columns]]


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scale", choices=list(SCALES), default="full")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--minutes", type=float, default=8.0, help="the whole suite's time budget (default 8)")
    parser.add_argument("--sections", nargs="+", choices=list(SHARES), default=list(SHARES))
    parser.add_argument("--skip-options", nargs="*", choices=list(SPEED_KEYS), default=None,
                        help="speed options not timed (default: compile at smoke scale, where inductor's "
                             "compilation on the CPU takes minutes; none at full scale)")
    parser.add_argument("--peak-tflops", type=float, default=None,
                        help="the GPU's dense bf16 peak for MFU (default: from its name: H100/H200 989, A100 312)")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    if args.skip_options is None:
        args.skip_options = ["compile"] if args.scale == "smoke" else []
    if args.out is None:
        device, now = torch.device(args.device).type, time.strftime("%Y%m%d-%H%M%S")
        args.out = REPO / "results" / "benchmarks" / f"suite-{args.scale}-{device}-{now}.json"
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    suite = Suite(args)
    try:
        report = suite.run()
    finally:
        shutil.rmtree(suite.workdir, ignore_errors=True)
    print(f"\ndevice: {report['device_name']}, scale: {args.scale}, torch {report['torch']}; JSON: {args.out}")
    print(table(report).to_string(index=False, float_format=lambda v: f"{v:.3g}", na_rep=""))
    return report


if __name__ == "__main__":
    main()
