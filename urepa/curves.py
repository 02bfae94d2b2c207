"""FID-vs-step curves, CFG sweeps and when a curve reaches a target FID: arithmetic on the metrics files, without
torch, so the light jobs that gather them (fid_curve, cfg_sweep, fid_summary, report) start in a fraction of a
second (urepa.evaluate, which scores the sample sets, imports torch)."""
from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)


def steps_to_target(points: list[dict], target: float | None) -> dict | None:
    """When a FID-vs-step curve first reaches `target` (FID at or below it): {"step", "how"}. `how` says what the
    step is: "interpolated", linearly between the two points that bracket the first crossing; "at_point", a point
    exactly on the target (or the curve's step-0 point, the pretrained model, already at or below it);
    "first_point", the first point is already at or below the target but is not step 0, so the curve reached it at
    that step or before; "not_reached" (step None). None without a target."""
    if target is None:
        return None
    points = sorted(points, key=lambda p: p["step"])
    for i, point in enumerate(points):
        if point["fid"] > target:
            continue
        if point["fid"] == target or point["step"] == 0:
            return {"step": float(point["step"]), "how": "at_point"}
        if i == 0:
            return {"step": float(point["step"]), "how": "first_point"}
        before = points[i - 1]
        fraction = (before["fid"] - target) / (before["fid"] - point["fid"])
        return {"step": before["step"] + fraction * (point["step"] - before["step"]), "how": "interpolated"}
    return {"step": None, "how": "not_reached"}


def fid_curve(point_files: list[str | Path]) -> dict:
    points = []
    for path in point_files:
        m = json.loads(Path(path).read_text())
        points.append({"step": m["checkpoint_step"], "fid": m["fid"], "sfid": m["sfid"], "kid_mean": m["kid_mean"],
                       "num_samples": m["num_generated"]})
    points.sort(key=lambda p: p["step"])
    log.info("FID-vs-step curve from %d point files: %s", len(points),
             ", ".join(f"step {p['step']} FID {p['fid']:.3f} ({p['num_samples']} samples)" for p in points))
    return {"points": points}


SWEEP_METRICS = ("fid", "sfid", "precision", "recall", "inception_score_mean", "num_generated")


def cfg_sweep(point_files: list[str | Path]) -> dict:
    """One run's metrics against the guidance scale (same weights, sampler, images and seed at every scale),
    and the scale with the lowest FID."""
    points = []
    for path in point_files:
        m = json.loads(Path(path).read_text())
        points.append({"cfg_scale": m["sampling"]["cfg_scale"], **{k: m[k] for k in SWEEP_METRICS},
                       "sampling": m["sampling"]})
    if not points:
        raise ValueError("a CFG sweep needs at least one scale")
    points.sort(key=lambda p: p["cfg_scale"])
    best = min(points, key=lambda p: p["fid"])
    log.info("CFG sweep from %d point files: %s; lowest FID at scale %s", len(points),
             ", ".join(f"scale {p['cfg_scale']} FID {p['fid']:.3f}" for p in points), best["cfg_scale"])
    return {"points": points, "best": {k: v for k, v in best.items() if k != "sampling"}}


def curve_target(curves: dict[str, dict[int, dict]], target_fid: float | None) -> float | None:
    """The FID every curve is timed to: the configured one, else the baseline's final curve FID (mean over its
    seeds) when the baseline is compared (how soon each run matches the baseline), else none."""
    baseline_finals = [c["points"][-1]["fid"] for c in curves.get("baseline", {}).values() if c["points"]]
    if target_fid is None and baseline_finals:
        return float(np.mean(baseline_finals))
    return target_fid


def add_targets(curves: dict[str, dict[int, dict]], target_fid: float | None) -> float | None:
    """Set each run's (`curves[ablation][seed]`) target (`curve_target`) and when it reaches it
    (`steps_to_target`); returns the target."""
    target_fid = curve_target(curves, target_fid)
    for by_seed in curves.values():
        for curve in by_seed.values():
            curve["target_fid"] = target_fid
            curve["steps_to_target"] = steps_to_target(curve["points"], target_fid)
    return target_fid
