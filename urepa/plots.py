"""The figures written beside the results: a run's loss curves, FID against the training step, and metrics against
the guidance scale (the t-SNE maps are drawn by urepa.analysis)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

# Stamped on every figure whose numbers come from the smoke tier's stand-in feature network, so a PNG seen alone
# (in the Snakemake report, or copied into slides) is never read as an Inception FID.
STAND_IN_STAMP = "STAND-IN feature network (random conv net, not Inception): these numbers test the pipeline only"
# The smallest y-range of the FID-vs-step plot, as a fraction of the largest FID drawn: curves that differ by less
# are drawn flat (as they are) rather than blown up to fill the axes.
FID_MIN_RELATIVE_SPAN = 0.1


def _pyplot():
    """matplotlib's pyplot on the file-only Agg backend (jobs have no display), imported when a figure is drawn."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def is_stand_in(feature_network: str | None) -> bool:
    """Whether a metrics file's `feature_network` is the stand-in (evaluate's description of it says so)."""
    return feature_network is not None and "stand-in" in feature_network


def _stamp_stand_in(fig) -> None:
    fig.text(0.5, 0.995, STAND_IN_STAMP, ha="center", va="top", fontsize=9, color="darkred", weight="bold",
             bbox={"facecolor": "#fff3cd", "edgecolor": "darkred", "boxstyle": "round,pad=0.3"})


def term_weights(settings: dict) -> dict[str, float]:
    """The weight of each alignment term in the loss, from a run's training settings: λ for the token term,
    λ·w for the manifold term (urepa.losses.Objective)."""
    coeff = settings["align_coeff"]
    return {"loss_token": coeff, "loss_manifold": coeff * settings["manifold_coeff"]}


def plot_losses(log_csv: str | Path, out_png: str | Path, title: str, weights: dict[str, float] | None = None) -> None:
    """A run's train_log.csv as one panel per loss term: raw steps faint, a rolling mean on top. A term whose
    weight is 0 (`weights`, see `term_weights`; without them, a term that was never computed or whose logged λ
    stays 0) is not drawn: its panel says "off (w = 0)", since it did not shape the training."""
    plt = _pyplot()

    table = pd.read_csv(log_csv)
    window = max(1, len(table) // 50)
    if weights is None:
        never_aligned = "align_coeff" in table and not (table["align_coeff"].fillna(0) != 0).any()
        weights = {} if not never_aligned else {"loss_token": 0.0, "loss_manifold": 0.0}
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    for ax, columns in zip(axes, (["loss", "loss_diff"], ["loss_token"], ["loss_manifold"])):
        off = [column for column in columns if weights.get(column, 1.0) == 0 or not table[column].notna().any()]
        plotted = [column for column in columns if column not in off]
        for column in plotted:
            ax.plot(table["step"], table[column], alpha=0.25)
            ax.plot(table["step"], table[column].rolling(window, min_periods=1).mean(), label=column)
        if plotted:
            ax.set_xlabel("step")
            ax.legend()
        else:  # an empty panel: no axes to read values from
            ax.set_xticks([])
            ax.set_yticks([])
            ax.text(0.5, 0.5, f"{', '.join(off)}: off (w = 0)", ha="center", va="center", transform=ax.transAxes,
                    color="grey")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(out_png, dpi=110)
    plt.close(fig)


def fid_axis_limits(values: list[float], min_relative_span: float = FID_MIN_RELATIVE_SPAN) -> tuple[float, float]:
    """y-limits for FIDs: the values' range with 5 % margins, widened about its middle to at least
    `min_relative_span` of the largest value, and never below 0 (FID is not negative)."""
    low, high = float(np.min(values)), float(np.max(values))
    span = max(high - low, min_relative_span * abs(high)) or 1.0
    middle = (low + high) / 2
    return max(0.0, middle - 0.55 * span), middle + 0.55 * span


def plot_fid_curves(curves: dict[str, dict], out_png: str | Path, target_source: str | None = None,
                    feature_network: str | None = None) -> None:
    """FID of each run's snapshots against the training step, with the target FID (`target_source` says where it
    comes from, in the legend) as a dashed line; stamped when the FIDs come from the stand-in network."""
    plt = _pyplot()

    fig, ax = plt.subplots(figsize=(7.5, 4.3))
    values = []
    for ablation, curve in curves.items():
        points = curve["points"]
        values += [p["fid"] for p in points]
        ax.plot([p["step"] for p in points], [p["fid"] for p in points], marker="o", label=ablation)
    target = next((c.get("target_fid") for c in curves.values() if c.get("target_fid") is not None), None)
    if target is not None:
        values.append(target)
        label = f"target {target:.3g}" + (f" ({target_source})" if target_source else "")
        ax.axhline(target, color="grey", linestyle="--", linewidth=1, label=label)
    if values:
        ax.set_ylim(*fid_axis_limits(values))
    ax.ticklabel_format(axis="y", useOffset=False, style="plain")
    ax.set_xlabel("training step")
    ax.set_ylabel("FID, EMA weights (lower is better)")
    # below the axes: a legend inside would hide the points it names
    ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.15), ncol=3, frameon=False)
    fig.tight_layout(rect=(0, 0, 1, 0.93) if is_stand_in(feature_network) else (0, 0, 1, 1))
    if is_stand_in(feature_network):
        _stamp_stand_in(fig)
    fig.savefig(out_png, dpi=110)
    plt.close(fig)


def plot_cfg_sweeps(sweeps: dict[str, dict], out_png: str | Path, feature_network: str | None = None) -> None:
    """FID, precision and recall against the guidance scale, one line per ablation; stamped when the scores come
    from the stand-in network."""
    plt = _pyplot()

    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    for ablation, sweep in sweeps.items():
        scales = [p["cfg_scale"] for p in sweep["points"]]
        for ax, key in zip(axes, ("fid", "precision", "recall")):
            ax.plot(scales, [p[key] for p in sweep["points"]], marker="o", label=ablation)
    fids = [p["fid"] for sweep in sweeps.values() for p in sweep["points"]]
    for ax, label in zip(axes, ("FID", "precision", "recall")):
        ax.set_xlabel("CFG scale")
        ax.set_ylabel(label)
        ax.ticklabel_format(axis="y", useOffset=False, style="plain")
        ax.legend()
    if fids:
        axes[0].set_ylim(*fid_axis_limits(fids))
    for ax in axes[1:]:  # fractions: their whole range, so 0 reads as 0 and not as the middle of the axis
        ax.set_ylim(-0.02, 1.02)
    fig.tight_layout(rect=(0, 0, 1, 0.9) if is_stand_in(feature_network) else (0, 0, 1, 1))
    if is_stand_in(feature_network):
        _stamp_stand_in(fig)
    fig.savefig(out_png, dpi=110)
    plt.close(fig)
