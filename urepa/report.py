"""Stage 6: one self-contained HTML page per tier comparing the ablations (figures embedded)."""
from __future__ import annotations

import base64
import html
import json
import logging
from pathlib import Path

import numpy as np
import pandas as pd

from .config import SD15_VAE

log = logging.getLogger(__name__)

METRIC_COLUMNS = [("fid", "FID"), ("sfid", "sFID"), ("kid_mean", "KID"), ("inception_score_mean", "IS"),
                  ("precision", "precision"), ("recall", "recall")]
# Each alignment score beside its chance level (the same score on shuffled image pairings).
ALIGNMENT_COLUMNS = ["cknna", "cknna_chance", "cca", "cca_chance", "head_token_cosine", "head_token_cosine_chance",
                     "head_cknna", "head_cknna_chance"]


def _image(path: str | Path, alt: str, width: int | None = None) -> str:
    data = base64.b64encode(Path(path).read_bytes()).decode()
    style = f' style="max-width:{width}px"' if width else ""
    return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{data}"{style}>'


def _table(frame: pd.DataFrame) -> str:
    return frame.to_html(index=False, float_format=lambda v: f"{v:.4g}", na_rep="–", border=0, classes="t")


HEADLINE_KEYS = ["fid", "sfid", "kid_mean", "kid_std", "inception_score_mean", "inception_score_std", "precision",
                 "recall", "num_generated", "num_reference", "feature_network", "sampling", "checkpoint_step", "weights"]
# Scores whose spread over seeds fid.json and the report give.
SPREAD_KEYS = ("fid", "sfid")


def spread(values: list[float]) -> dict:
    """Mean and sample standard deviation (n - 1; none for one value) of a score over seeds."""
    values = np.asarray(values, dtype=np.float64)
    return {"mean": float(values.mean()), "std": float(values.std(ddof=1)) if len(values) > 1 else None,
            "n": len(values)}


def fid_summary(metrics: dict[str, dict[int, dict]], sweeps: dict[str, dict[int, dict]]) -> dict:
    """results/<tier>/fid.json from `metrics[ablation][seed]` and `sweeps[ablation][seed]`: per ablation, the
    headline numbers of each seed's run (its final sample set at the configured sampler, and the best point of
    its CFG sweep: fewer samples and the curve sampler, so compare it across ablations, not with the headline
    FID), their mean ± std over the seeds present, and FID's difference to the baseline paired by seed."""
    summary = {}
    for ablation, by_seed in metrics.items():
        runs = {f"seed-{seed}": {**{k: m.get(k) for k in HEADLINE_KEYS}, "cfg_sweep_best": sweeps[ablation][seed]["best"]}
                for seed, m in sorted(by_seed.items())}
        summary[ablation] = {"seeds": sorted(by_seed), **{k: spread([m[k] for m in by_seed.values()]) for k in SPREAD_KEYS},
                             "runs": runs}
        paired = sorted(set(by_seed) & set(metrics.get("baseline", {})))
        if ablation != "baseline" and paired:
            summary[ablation]["fid_vs_baseline"] = {
                **spread([by_seed[s]["fid"] - metrics["baseline"][s]["fid"] for s in paired]), "seeds": paired}
        log.info("%s: FID %.4g over seeds %s", ablation, summary[ablation]["fid"]["mean"], sorted(by_seed))
    return summary


def _sweep_rows(sweeps: dict[str, dict]) -> list[dict]:
    return [{"run": a, "CFG scale": p["cfg_scale"], "FID": p["fid"], "sFID": p["sfid"], "precision": p["precision"],
             "recall": p["recall"], "IS": p["inception_score_mean"], "samples": p["num_generated"],
             "best": "✓" if p["cfg_scale"] == s["best"]["cfg_scale"] else ""}
            for a, s in sweeps.items() for p in s["points"]]


def run_labels(runs: dict[str, dict[int, object]]) -> dict[str, tuple[str, int]]:
    """A label per (ablation, seed) run: the ablation's name, with the seed once any ablation has several."""
    several = any(len(by_seed) > 1 for by_seed in runs.values())
    return {f"{a} · seed {seed}" if several else a: (a, seed) for a, by_seed in runs.items() for seed in by_seed}


def by_label(nested: dict[str, dict[int, object]]) -> dict[str, object]:
    """`nested[ablation][seed]` keyed by run label instead."""
    return {label: nested[a][seed] for label, (a, seed) in run_labels(nested).items()}


def _mean_std(summary: dict) -> str:
    """A `spread` as "mean ± std" (the mean alone for one value)."""
    return f"{summary['mean']:.4g}" if summary["std"] is None else f"{summary['mean']:.4g} ± {summary['std']:.2g}"


PROJECTORS = {"mlp": "MLP projector", "conv": "1x1 conv projector", "conv3x3": "3x3 conv projector"}
FINETUNE_MODES = {"lora": "LoRA", "partial": "partial blocks", "full": "full U-Net"}


def objective_text(settings: dict) -> str:
    """What a run trains on, in one line, from its training settings (urepa.config.train_settings): the terms and
    their weights, the projector, the target normalisation, λ's schedule and cutoff, the layers and the fine-tune
    mode; so a row's name is never the only account of what it is."""
    if settings["align_coeff"] == 0:
        return f"diffusion loss only (no alignment), {FINETUNE_MODES[settings['finetune']]}"
    terms = "token"
    if settings["manifold_coeff"] > 0:
        terms += f" + {settings['manifold_coeff']:g} × manifold ({settings['manifold_mode']} Gram)"
    parts = [f"λ={settings['align_coeff']:g} · ({terms})", PROJECTORS[settings["projector"]]]
    if settings["target_spatial_norm"] is not None:
        parts.append(f"spatially normalised targets (α={settings['target_spatial_norm']:g})")
    schedule = settings["align_schedule"]
    if schedule["warmup_steps"]:
        parts.append(f"λ warm-up {schedule['warmup_steps']} steps")
    if schedule["kind"] != "constant" and schedule["decay_steps"]:
        parts.append(f"λ {schedule['kind']} decay to {schedule['end']:g} over {schedule['decay_steps']} steps")
    if schedule["cutoff_step"] is not None:
        parts.append(f"alignment off after {schedule['cutoff_step'] / settings['max_steps']:.0%} "
                     f"(from step {schedule['cutoff_step']} of {settings['max_steps']})")
    if settings["align_layers"] != ["mid"]:
        parts.append("layers " + " + ".join(settings["align_layers"]))
    parts.append(FINETUNE_MODES[settings["finetune"]])
    return ", ".join(parts)


def render_report(tier: str, runs: dict[str, dict[int, dict[str, str]]], curves: dict[str, dict[int, dict]],
                  sweeps: dict[str, dict[int, dict]], fid_curve_png: str | Path, cfg_sweep_png: str | Path,
                  out_html: str | Path, run_vaes: dict[str, str], reconstructions: dict[str, dict],
                  settings: dict[str, dict] | None = None) -> None:
    """`runs[ablation][seed]` holds the paths of that run's metrics.json, alignment.json, loss_curve.png,
    tsne.png and sample_grid.png; `curves[ablation][seed]` its FID-vs-step points with target and step;
    `sweeps[ablation][seed]` its CFG sweep; `run_vaes[ablation]` the VAE it trains on, and
    `reconstructions[vae]` that VAE's recon.json; `settings[ablation]` its training settings, which name each
    row's objective. Headline scores are mean ± std over the seeds present."""
    labels = run_labels(runs)
    metrics = {a: {seed: json.loads(Path(p["metrics"]).read_text()) for seed, p in by_seed.items()}
               for a, by_seed in runs.items()}
    alignment = {label: json.loads(Path(runs[a][seed]["alignment"]).read_text()) for label, (a, seed) in labels.items()}
    networks = {m["feature_network"] for by_seed in metrics.values() for m in by_seed.values()}
    summary = fid_summary(metrics, sweeps)

    rows = []
    for ablation, by_seed in metrics.items():
        row = {"ablation": ablation, "seeds": len(by_seed)}
        if settings and ablation in settings:
            row["objective"] = objective_text(settings[ablation])
        row.update({label: _mean_std(spread([m[key] for m in by_seed.values()])) for key, label in METRIC_COLUMNS})
        if "fid_vs_baseline" in summary[ablation]:
            row["ΔFID vs baseline"] = _mean_std(summary[ablation]["fid_vs_baseline"])
        row["best-CFG FID"] = _mean_std(spread([sweeps[ablation][seed]["best"]["fid"] for seed in by_seed]))
        row["at CFG"] = ", ".join(sorted({f"{sweeps[ablation][seed]['best']['cfg_scale']:g}" for seed in by_seed}))
        first = next(iter(by_seed.values()))
        row.update(samples=first["num_generated"], step=first.get("checkpoint_step"),
                   sampler=_sampling_text(first["sampling"]), VAE=run_vaes[ablation])
        rows.append(row)
    run_rows = [{"run": label, **{name: metrics[a][seed].get(key) for key, name in METRIC_COLUMNS},
                 "best-CFG FID": sweeps[a][seed]["best"]["fid"]} for label, (a, seed) in labels.items()]
    flat_curves, flat_sweeps, flat_runs = by_label(curves), by_label(sweeps), by_label(runs)
    curve_rows = [{"run": label, "target FID": c.get("target_fid"), "first step at target": c.get("steps_to_target"),
                   "points": len(c["points"]), "images per point": c["points"][0]["num_samples"] if c["points"] else None}
                  for label, c in flat_curves.items()]
    align_rows = []
    for label, result in alignment.items():
        for entry in result["timesteps"]:
            align_rows.append({"run": label, "layer": result["layer"], "timestep": entry["timestep"],
                               **{column: entry.get(column) for column in ALIGNMENT_COLUMNS}})
    cca_setup = next(iter(alignment.values()))["timesteps"][0]

    warning = ""
    if any("stand-in" in n for n in networks):
        warning = ('<p class="warn"><b>Stand-in feature network.</b> These metrics come from a random '
                   'convolutional network, not Inception (the smoke tier has no real weights): they test the '
                   'pipeline and are not comparable to published FID values.</p>')
    sections = [
        f"<h1>urepa — {html.escape(tier)}</h1>",
        f"<p>Feature network: {html.escape(', '.join(sorted(networks)))}</p>", warning,
        "<h2>Ablations</h2>", _table(pd.DataFrame(rows)),
        "<p>FID, sFID, IS and precision/recall of the final sample set (EMA weights), as mean ± standard "
        "deviation over the seeds present (each seed: its own training run and its own sample set); ΔFID is against "
        "the baseline, paired by seed (negative: better). Best-CFG FID is the lowest FID of each run's CFG sweep "
        "(curve sampler, fewer samples): compare it across ablations, not with the FID column.</p>",
        "<p>Objective: what each row trains on, read from its training settings: λ weighs the alignment terms "
        "(token: 1 − cosine to DINOv2's tokens; manifold: the squared difference of the similarity Grams, between "
        "images (sample) or between one image's tokens (token)), then the align head's projector, the DINOv2 "
        "targets' normalisation, λ's schedule and the fine-tuned parameters.</p>",
        *(["<h3>Runs</h3>", _table(pd.DataFrame(run_rows))] if len(run_rows) > len(rows) else []),
        "<h2>Guidance scale</h2>", _image(cfg_sweep_png, "CFG sweep", 1000),
        _table(pd.DataFrame(_sweep_rows(flat_sweeps))),
        "<h2>FID vs training step</h2>", _image(fid_curve_png, "FID vs step", 700), _table(pd.DataFrame(curve_rows)),
        "<h2>Training losses</h2>",
        "".join(f"<h3>{html.escape(a)}</h3>{_image(p['loss_curve'], a + ' losses', 1000)}" for a, p in flat_runs.items()),
        "<h2>Alignment with DINOv2</h2>",
        "<p>On a fixed held-out batch of validation images at fixed timesteps, EMA weights. CKNNA and CCA "
        "compare the image-pooled U-Net features of the aligned layer with pooled DINOv2 tokens; token "
        "cosine and head CKNNA compare the align head's tokens with DINOv2's (only where a head was trained). "
        "CCA is fitted on one half of the images and scored on the other "
        f"({cca_setup.get('cca_fit_images')} + {cca_setup.get('cca_scored_images')} images, PCA to "
        f"{cca_setup.get('cca_pca_dims')} dimensions, mean of {cca_setup.get('cca_components')} canonical "
        "correlations). Each <i>_chance</i> column is the same score with the DINOv2 side's images shuffled "
        "(mean over seeded shufflings): what unrelated features of the same structure would score.</p>",
        _table(pd.DataFrame(align_rows)),
        "".join(f"<h3>{html.escape(a)}</h3>{_image(p['tsne'], a + ' t-SNE', 900)}" for a, p in flat_runs.items()),
        *_reconstruction_section(run_vaes, reconstructions),
        "<h2>Samples</h2>",
        "".join(f"<h3>{html.escape(a)}</h3>{_image(p['grid'], a + ' samples', 1000)}" for a, p in flat_runs.items()),
    ]
    style = ("body{font-family:sans-serif;max-width:1100px;margin:2em auto;color:#222}"
             "table.t{border-collapse:collapse;margin:1em 0}table.t td,table.t th{padding:4px 10px;"
             "border-bottom:1px solid #ddd;text-align:right}.warn{background:#fff3cd;padding:.6em 1em}")
    Path(out_html).write_text(f"<!doctype html><html><head><meta charset='utf-8'><title>urepa {html.escape(tier)}"
                              f"</title><style>{style}</style></head><body>{''.join(sections)}</body></html>")
    log.info("report of tier %s (%s) written to %s", tier, ", ".join(f"{a}: {len(by_seed)} seed(s)"
                                                                     for a, by_seed in runs.items()), out_html)


RECONSTRUCTION_COLUMNS = (("psnr", "PSNR (dB)"), ("ssim", "SSIM"), ("lpips", "LPIPS"), ("rfid", "rFID"))


def _reconstruction_section(run_vaes: dict[str, str], reconstructions: dict[str, dict]) -> list[str]:
    """The "VAE reconstruction" table: every VAE the compared runs train on, encode -> decode of the validation
    subset; and, where runs use a VAE other than SD-1.5's, how to read their FID."""
    rows = [{"VAE": name, "runs": ", ".join(a for a, vae in run_vaes.items() if vae == name),
             "images": result["images"], **{label: result[key] for key, label in RECONSTRUCTION_COLUMNS},
             "feature network": result["feature_network"], "LPIPS network": result["lpips_network"]}
            for name, result in reconstructions.items()]
    text = ("<p>Each VAE encodes and decodes the tier's validation subset (the caches' square crop, posterior mean). "
            "PSNR and SSIM are per-image means; LPIPS (VGG) per-image mean, lower is better; rFID is the FID of the "
            "reconstructions against the originals with the tier's feature network: the floor a generator decoded "
            "by this VAE cannot go below.</p>")
    if set(run_vaes.values()) - {SD15_VAE}:
        text += ("<p>A run on a VAE other than SD-1.5's fine-tunes a U-Net pretrained on SD-VAE latents onto "
                 "another latent space: its FID mixes that VAE's reconstruction (rFID above) with how far the U-Net "
                 "adapted to the new latents. Read alignment's effect within one VAE (a run against the baseline on "
                 "the same VAE), and the VAE's effect beside its rFID.</p>")
    if any("stand-in" in result["lpips_network"] for result in reconstructions.values()):
        text += ('<p class="warn">LPIPS here uses a random VGG16 backbone (no real weights on this tier): the '
                 'values test the pipeline and mean nothing.</p>')
    return ["<h2>VAE reconstruction</h2>", _table(pd.DataFrame(rows)), text]


def _sampling_text(sampling: dict) -> str:
    interval = f"t/T∈[{sampling['guidance_low']}, {sampling['guidance_high']}]"
    if "guidance_sigma_low" in sampling:
        interval += f", σ∈[{sampling['guidance_sigma_low']:.3g}, {sampling['guidance_sigma_high']:.3g}]"
    return f"{sampling['sampler']} {sampling['steps']} steps, CFG {sampling['cfg_scale']} in {interval}"
