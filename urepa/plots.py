"""The figures written beside the results: a run's loss curves, FID against the training step, and metrics against
the guidance scale (the t-SNE maps are drawn by urepa.analysis)."""
from __future__ import annotations

from pathlib import Path

import pandas as pd


def _pyplot():
    """matplotlib's pyplot on the file-only Agg backend (jobs have no display), imported when a figure is drawn."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_losses(log_csv: str | Path, out_png: str | Path, title: str) -> None:
    """A run's train_log.csv as one panel per loss term: raw steps faint, a rolling mean on top."""
    plt = _pyplot()

    table = pd.read_csv(log_csv)
    window = max(1, len(table) // 50)
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    for ax, columns in zip(axes, (["loss", "loss_diff"], ["loss_token"], ["loss_manifold"])):
        plotted = [column for column in columns if table[column].notna().any()]
        for column in plotted:
            ax.plot(table["step"], table[column], alpha=0.25)
            ax.plot(table["step"], table[column].rolling(window, min_periods=1).mean(), label=column)
        ax.set_xlabel("step")
        if plotted:
            ax.legend()
        else:  # the baseline: no align head, so no alignment loss to show
            ax.text(0.5, 0.5, f"{', '.join(columns)}: not computed (λ = 0)", ha="center", va="center",
                    transform=ax.transAxes)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(out_png, dpi=110)
    plt.close(fig)


def plot_fid_curves(curves: dict[str, dict], out_png: str | Path) -> None:
    plt = _pyplot()

    fig, ax = plt.subplots(figsize=(6.5, 4))
    for ablation, curve in curves.items():
        points = curve["points"]
        ax.plot([p["step"] for p in points], [p["fid"] for p in points], marker="o", label=ablation)
    target = next((c.get("target_fid") for c in curves.values() if c.get("target_fid") is not None), None)
    if target is not None:
        ax.axhline(target, color="grey", linestyle="--", linewidth=1, label=f"target {target:.3g}")
    ax.set_xlabel("training step")
    ax.set_ylabel("FID (EMA weights)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out_png, dpi=110)
    plt.close(fig)


def plot_cfg_sweeps(sweeps: dict[str, dict], out_png: str | Path) -> None:
    """FID, precision and recall against the guidance scale, one line per ablation."""
    plt = _pyplot()

    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    for ablation, sweep in sweeps.items():
        scales = [p["cfg_scale"] for p in sweep["points"]]
        for ax, key in zip(axes, ("fid", "precision", "recall")):
            ax.plot(scales, [p[key] for p in sweep["points"]], marker="o", label=ablation)
    for ax, label in zip(axes, ("FID", "precision", "recall")):
        ax.set_xlabel("CFG scale")
        ax.set_ylabel(label)
        ax.legend()
    fig.tight_layout()
    fig.savefig(out_png, dpi=110)
    plt.close(fig)
