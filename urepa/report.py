"""Stage 6: one self-contained HTML page per tier comparing the ablations (figures embedded)."""
from __future__ import annotations

import base64
import html
import json
from pathlib import Path

import pandas as pd

METRIC_COLUMNS = [("fid", "FID"), ("sfid", "sFID"), ("kid_mean", "KID"), ("inception_score_mean", "IS"),
                  ("precision", "precision"), ("recall", "recall")]


def _image(path: str | Path, alt: str, width: int | None = None) -> str:
    data = base64.b64encode(Path(path).read_bytes()).decode()
    style = f' style="max-width:{width}px"' if width else ""
    return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{data}"{style}>'


def _table(frame: pd.DataFrame) -> str:
    return frame.to_html(index=False, float_format=lambda v: f"{v:.4g}", na_rep="–", border=0, classes="t")


def fid_summary(metrics: dict[str, dict], sweeps: dict[str, dict]) -> dict:
    """results/<tier>/fid.json: the headline numbers of every compared ablation (its final sample set at the
    configured sampler), and beside them the best point of its CFG sweep (fewer samples and the curve
    sampler: compare it across ablations, not with the headline FID)."""
    keys = ["fid", "sfid", "kid_mean", "kid_std", "inception_score_mean", "inception_score_std", "precision",
            "recall", "num_generated", "num_reference", "feature_network", "sampling", "checkpoint_step", "weights"]
    return {ablation: {**{k: m.get(k) for k in keys}, "cfg_sweep_best": sweeps[ablation]["best"]}
            for ablation, m in metrics.items()}


def plot_losses(log_csv: str | Path, out_png: str | Path, title: str) -> None:
    """A run's train_log.csv as one panel per loss term: raw steps faint, a rolling mean on top."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

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
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

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
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

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


def _sweep_rows(sweeps: dict[str, dict]) -> list[dict]:
    return [{"ablation": a, "CFG scale": p["cfg_scale"], "FID": p["fid"], "sFID": p["sfid"], "precision": p["precision"],
             "recall": p["recall"], "IS": p["inception_score_mean"], "samples": p["num_generated"],
             "best": "✓" if p["cfg_scale"] == s["best"]["cfg_scale"] else ""}
            for a, s in sweeps.items() for p in s["points"]]


def render_report(tier: str, runs: dict[str, dict[str, str]], curves: dict[str, dict], sweeps: dict[str, dict],
                  fid_curve_png: str | Path, cfg_sweep_png: str | Path, out_html: str | Path) -> None:
    """`runs[ablation]` holds the paths of that run's metrics.json, alignment.json, loss_curve.png,
    tsne.png and sample_grid.png; `curves[ablation]` its FID-vs-step points with target and step;
    `sweeps[ablation]` its CFG sweep."""
    metrics = {a: json.loads(Path(p["metrics"]).read_text()) for a, p in runs.items()}
    alignment = {a: json.loads(Path(p["alignment"]).read_text()) for a, p in runs.items()}
    networks = {m["feature_network"] for m in metrics.values()}

    rows = []
    for ablation, m in metrics.items():
        row = {"ablation": ablation, **{label: m.get(key) for key, label in METRIC_COLUMNS}}
        if "baseline" in metrics and ablation != "baseline":
            row["ΔFID vs baseline"] = m["fid"] - metrics["baseline"]["fid"]
        row["best-CFG FID"] = sweeps[ablation]["best"]["fid"]
        row["at CFG"] = sweeps[ablation]["best"]["cfg_scale"]
        row.update(samples=m["num_generated"], step=m.get("checkpoint_step"),
                   sampler=_sampling_text(m["sampling"]))
        rows.append(row)
    curve_rows = [{"ablation": a, "target FID": c.get("target_fid"), "first step at target": c.get("steps_to_target"),
                   "points": len(c["points"]), "images per point": c["points"][0]["num_samples"] if c["points"] else None}
                  for a, c in curves.items()]
    align_rows = []
    for ablation, result in alignment.items():
        for entry in result["timesteps"]:
            align_rows.append({"ablation": ablation, "layer": result["layer"], "timestep": entry["timestep"],
                               **{k: v for k, v in entry.items() if k != "timestep"}})

    warning = ""
    if any("stand-in" in n for n in networks):
        warning = ('<p class="warn"><b>Stand-in feature network.</b> These metrics come from a random '
                   'convolutional network, not Inception (the smoke tier has no real weights): they test the '
                   'pipeline and are not comparable to published FID values.</p>')
    sections = [
        f"<h1>urepa — {html.escape(tier)}</h1>",
        f"<p>Feature network: {html.escape(', '.join(sorted(networks)))}</p>", warning,
        "<h2>Ablations</h2>", _table(pd.DataFrame(rows)),
        "<p>FID, sFID, IS and precision/recall of the final sample set (EMA weights); ΔFID is against the "
        "baseline (negative: better). Best-CFG FID is the lowest FID of the run's CFG sweep (curve sampler, fewer "
        "samples): compare it across ablations, not with the FID column.</p>",
        "<h2>Guidance scale</h2>", _image(cfg_sweep_png, "CFG sweep", 1000),
        _table(pd.DataFrame(_sweep_rows(sweeps))),
        "<h2>FID vs training step</h2>", _image(fid_curve_png, "FID vs step", 700), _table(pd.DataFrame(curve_rows)),
        "<h2>Training losses</h2>",
        "".join(f"<h3>{html.escape(a)}</h3>{_image(p['loss_curve'], a + ' losses', 1000)}" for a, p in runs.items()),
        "<h2>Alignment with DINOv2</h2>",
        "<p>On a fixed held-out batch of validation images at fixed timesteps, EMA weights. CKNNA and CCA "
        "compare the image-pooled U-Net features of the aligned layer with pooled DINOv2 tokens; token "
        "cosine is between the align head's tokens and DINOv2's (only where a head was trained).</p>",
        _table(pd.DataFrame(align_rows)),
        "".join(f"<h3>{html.escape(a)}</h3>{_image(p['tsne'], a + ' t-SNE', 900)}" for a, p in runs.items()),
        "<h2>Samples</h2>",
        "".join(f"<h3>{html.escape(a)}</h3>{_image(p['grid'], a + ' samples', 1000)}" for a, p in runs.items()),
    ]
    style = ("body{font-family:sans-serif;max-width:1100px;margin:2em auto;color:#222}"
             "table.t{border-collapse:collapse;margin:1em 0}table.t td,table.t th{padding:4px 10px;"
             "border-bottom:1px solid #ddd;text-align:right}.warn{background:#fff3cd;padding:.6em 1em}")
    Path(out_html).write_text(f"<!doctype html><html><head><meta charset='utf-8'><title>urepa {html.escape(tier)}"
                              f"</title><style>{style}</style></head><body>{''.join(sections)}</body></html>")


def _sampling_text(sampling: dict) -> str:
    interval = f"t/T∈[{sampling['guidance_low']}, {sampling['guidance_high']}]"
    if "guidance_sigma_low" in sampling:
        interval += f", σ∈[{sampling['guidance_sigma_low']:.3g}, {sampling['guidance_sigma_high']:.3g}]"
    return f"{sampling['sampler']} {sampling['steps']} steps, CFG {sampling['cfg_scale']} in {interval}"
