"""Stage 6: one self-contained HTML page per tier comparing the ablations (figures embedded)."""
from __future__ import annotations

import base64
import html
import json
import logging
from pathlib import Path

import numpy as np
import pandas as pd

from .config import GENERATED_SOURCES, PRETRAINED, SD15_VAE
from .curves import add_targets, steps_to_target

log = logging.getLogger(__name__)

METRIC_COLUMNS = [("fid", "FID"), ("sfid", "sFID"), ("kid_mean", "KID"), ("inception_score_mean", "IS"),
                  ("precision", "precision"), ("recall", "recall")]
# Each alignment score beside its chance level (the same score on shuffled image pairings), under a header that
# names it and its range: the pooled U-Net features (every run), then the align head's tokens (runs with a head).
FEATURE_ALIGNMENT_COLUMNS = {"cknna": "CKNNA (0–1)", "cknna_chance": "CKNNA by chance",
                             "cca": "CCA: mean canonical corr. (0–1)", "cca_chance": "CCA by chance"}
HEAD_ALIGNMENT_COLUMNS = {"head_token_cosine": "token cosine (−1–1)", "head_token_cosine_chance": "cosine by chance",
                          "head_cknna": "head CKNNA (0–1)", "head_cknna_chance": "head CKNNA by chance"}


def _image(path: str | Path, alt: str, width: int | None = None) -> str:
    data = base64.b64encode(Path(path).read_bytes()).decode()
    style = f' style="max-width:{width}px"' if width else ""
    return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{data}"{style}>'


def _table(frame: pd.DataFrame) -> str:
    table = frame.to_html(index=False, float_format=lambda v: f"{v:.4g}", na_rep="–", border=0, classes="t")
    return f'<div class="scroll">{table}</div>'


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
                  out_html: str | Path, run_vaes: dict[str, str], reconstructions: dict[str, dict], fid: dict,
                  probes: dict[str, dict] | None = None, settings: dict[str, dict] | None = None,
                  target_fid: float | None = None, tier_source: str | None = None,
                  pretrained_sweep: dict | None = None, comparison_grid_png: str | Path | None = None) -> None:
    """`runs[ablation][seed]` holds the paths of that run's metrics.json, alignment.json, loss_curve.png,
    tsne.png and sample_grid.png; `curves[ablation][seed]` its FID-vs-step points with target and step;
    `sweeps[ablation][seed]` its CFG sweep; `run_vaes[ablation]` the VAE it trains on, and
    `reconstructions[vae]` that VAE's recon.json; `fid` is the tier's fid.json; `probes[row label]` a probe.json
    (`_probe_section`); `settings[ablation]` its training settings, which name each row's objective;
    `target_fid` the configured `evaluate.target_fid` (the captions say where the curves' target comes from),
    `tier_source` the tier's `source` (the sample grids' caption), `pretrained_sweep` the CFG sweep of SD-1.5 as
    it is (its row of the table is fid.json's `pretrained`) and `comparison_grid_png` the same-noise grid
    (`_comparison_grid_section`). Headline scores are mean ± std over the seeds present."""
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
        row.update(cost_cells(fid, ablation))
        rows.append(row)
    if PRETRAINED in fid:
        rows.insert(0, pretrained_row(fid[PRETRAINED], objective=bool(settings)))
    run_rows = [{"run": label, **{name: metrics[a][seed].get(key) for key, name in METRIC_COLUMNS},
                 "best-CFG FID": sweeps[a][seed]["best"]["fid"]} for label, (a, seed) in labels.items()]
    flat_curves, flat_sweeps, flat_runs = by_label(curves), by_label(sweeps), by_label(runs)
    curve_rows = [{"run": label, "points": len(c["points"]), "images per point": c["points"][0]["num_samples"] if c["points"] else None}
                  for label, c in flat_curves.items()]

    warning = ""
    if any("stand-in" in n for n in networks):
        warning = ('<p class="warn"><b>Stand-in feature network.</b> These metrics come from a random '
                   'convolutional network, not Inception (the smoke tier has no real weights): they test the '
                   'pipeline and are not comparable to published FID values.</p>')
    sections = [
        f"<h1>urepa — {html.escape(tier)}</h1>",
        f"<p>Feature network: {html.escape(', '.join(sorted(networks)))}</p>", warning,
        "<h2>Ablations</h2>", *shared_columns_apart(pd.DataFrame(rows), SHARED_SETUP_COLUMNS),
        "<p>FID, sFID, IS and precision/recall of the final sample set (EMA weights), as mean ± standard "
        "deviation over the seeds present (each seed: its own training run and its own sample set); ΔFID is against "
        "the baseline, paired by seed (negative: better). Best-CFG FID is the lowest FID of each run's CFG sweep "
        "(curve sampler, fewer samples): compare it across ablations, not with the FID column.</p>",
        "<p>Objective: what each row trains on, read from its training settings: λ weighs the alignment terms "
        "(token: 1 − cosine to DINOv2's tokens; manifold: the squared difference of the similarity Grams, between "
        "images (sample) or between one image's tokens (token)), then the align head's projector, the DINOv2 "
        "targets' normalisation, λ's schedule and the fine-tuned parameters.</p>",
        *(["<h3>Runs</h3>", "<p>The same scores per training run (one row per ablation and seed), before the "
           "mean over seeds.</p>", _table(pd.DataFrame(run_rows))] if len(run_rows) > len(rows) else []),
        *([pretrained_text(fid[PRETRAINED])] if PRETRAINED in fid else []),
        "<h2>Guidance scale</h2>",
        "<p>FID, precision and recall of each run's final EMA weights against the classifier-free guidance scale "
        "(the curve sampler and image count at every scale): read across a line for the scale with the lowest FID, "
        "and down the table for the values; ✓ marks each run's best scale.</p>",
        _image(cfg_sweep_png, "CFG sweep", 1100),
        _table(pd.DataFrame(_sweep_rows({PRETRAINED: pretrained_sweep, **flat_sweeps} if pretrained_sweep
                                        else flat_sweeps))),
        "<h2>FID vs training step</h2>",
        f"<p>FID of each run's EMA snapshots against the training step (lower is better); the dashed line is the "
        f"target every run is timed to: {_target_text(target_fid)}. The table gives each curve's points and the "
        "images scored per point.</p>",
        _image(fid_curve_png, "FID vs step", 800), _table(pd.DataFrame(curve_rows)),
        f"<p>{fid_difference_note(metrics, flat_curves, flat_sweeps)}</p>",
        *convergence_section(fid),
        "<h2>Training losses</h2>",
        "<p>Each run's loss terms per step (faint) with a rolling mean (solid), lower is better: total and diffusion "
        "loss, the token term, the manifold term. A term whose weight in the loss is zero is not drawn: its panel "
        "says <i>off (w = 0)</i>.</p>",
        "".join(f"<h3>{html.escape(a)}</h3>{_image(p['loss_curve'], a + ' losses', 1100)}"
                for a, p in flat_runs.items()),
        *alignment_section(alignment),
        "<p>t-SNE maps at the middle analysis timestep, the same three panels for every run: the U-Net's pooled "
        "features, DINOv2's pooled tokens, and the align head's tokens in one map with DINOv2's; colour is the "
        "class (legend). Read them for class clusters, and in the third panel for circles (U-Net) landing on the "
        "crosses (DINOv2) of their class; a map's axes mean nothing.</p>",
        "".join(f"<h3>{html.escape(a)}</h3>{_image(p['tsne'], a + ' t-SNE', 1100)}" for a, p in flat_runs.items()),
        *_reconstruction_section(run_vaes, reconstructions),
        *(_probe_section(probes) if probes else []),
        *(_comparison_grid_section(comparison_grid_png) if comparison_grid_png else []),
        "<h2>Samples</h2>", *samples_caption(tier, tier_source),
        "".join(f"<h3>{html.escape(a)}</h3>{_image(p['grid'], a + ' samples', 1100)}" for a, p in flat_runs.items()),
    ]
    # Wide tables scroll inside the page's column instead of widening it; images shrink to the column.
    style = ("body{font-family:sans-serif;max-width:1150px;margin:2em auto;padding:0 1em;color:#222}"
             "img{max-width:100%;height:auto}.scroll{overflow-x:auto}"
             "table.t{border-collapse:collapse;margin:1em 0;font-size:.9em}table.t td,table.t th{padding:4px 8px;"
             "border-bottom:1px solid #ddd;text-align:right}.warn{background:#fff3cd;padding:.6em 1em}")
    Path(out_html).write_text(f"<!doctype html><html><head><meta charset='utf-8'><title>urepa {html.escape(tier)}"
                              f"</title><style>{style}</style></head><body>{''.join(sections)}</body></html>")
    log.info("report of tier %s (%s) written to %s", tier, ", ".join(f"{a}: {len(by_seed)} seed(s)"
                                                                     for a, by_seed in runs.items()), out_html)


def pretrained_row(entry: dict, objective: bool) -> dict:
    """The Ablations table's reference row, from fid.json's `pretrained` entry (SD-1.5 as it is, one seed: the
    chosen one), with the ablations' columns in their order; no training cost."""
    (run,) = entry["runs"].values()
    row = {"ablation": PRETRAINED, "seeds": len(entry["seeds"]),
           **({"objective": "SD-1.5 as it is (no fine-tuned weights)"} if objective else {}),
           **{label: _mean_std(spread([run[key]])) for key, label in METRIC_COLUMNS}}
    if "fid_vs_baseline" in entry:
        row["ΔFID vs baseline"] = _mean_std(entry["fid_vs_baseline"])
    best = run["cfg_sweep_best"]
    return {**row, "best-CFG FID": _mean_std(spread([best["fid"]])), "at CFG": f"{best['cfg_scale']:g}",
            "samples": run["num_generated"], "step": run["checkpoint_step"], "sampler": _sampling_text(run["sampling"]),
            "VAE": SD15_VAE, "training cost (device-h)": "–"}


def pretrained_text(entry: dict) -> str:
    """How to read the `pretrained` row, and where else it appears."""
    seed = entry["seeds"][0]
    return (f"<p>The <i>pretrained</i> row is SD-1.5 as it is (no fine-tuned weights; for LoRA runs, the U-Net "
            f"before its adapter), sampled with the same sampler, prompts, count and initial noise (seed {seed}) as "
            "the final sets: what every fine-tune started from. Its curve-sampler point is step 0 of every "
            "FID-vs-step curve, and its CFG sweep is the <i>pretrained</i> line of the guidance-scale figure.</p>")


def _comparison_grid_section(png: str | Path) -> list[str]:
    """The same-noise comparison grid (urepa.sample_sets.comparison_grid) and how to read it."""
    return ["<h2>Same-noise comparison</h2>", _image(png, "same-noise comparison grid", 1000),
            "<p>A row per class, a column per model (SD-1.5 as it is, then each compared ablation at the chosen "
            "seed): every cell of a row is the same image of its final sample set, drawn from the same initial noise "
            "and prompt, so the differences along a row come from the weights alone.</p>"]
# The Ablations table's columns of set-up, not of result: said once above the table when every row has the same
# value (the usual case), which keeps the table within a 1280 px window.
SHARED_SETUP_COLUMNS = ("samples", "step", "sampler")


def shared_columns_apart(frame: pd.DataFrame, columns: tuple[str, ...]) -> list[str]:
    """`frame` as a table, less those of `columns` whose value is the same in every row, which one line above the
    table gives instead."""
    shared = [c for c in columns if c in frame and frame[c].astype(str).nunique() == 1]
    line = " · ".join(f"{c}: {html.escape(str(frame[c].iloc[0]))}" for c in shared)
    return ([f"<p>Every row: {line}.</p>"] if shared else []) + [_table(frame.drop(columns=shared))]


def alignment_section(alignment: dict[str, dict]) -> list[str]:
    """The "Alignment with DINOv2" tables from each run's alignment.json (`alignment[run label]`): the pooled U-Net
    features of every run, then the align heads' tokens of the runs that have one, each score beside its chance
    level under a header that names it and its range (two narrow tables, not one of eleven raw key names)."""
    features, heads = [], []
    for label, result in alignment.items():
        for entry in result["timesteps"]:
            features.append({"run": label, "layer": result["layer"], "timestep t": entry["timestep"],
                             **{name: entry.get(key) for key, name in FEATURE_ALIGNMENT_COLUMNS.items()}})
            if "head_token_cosine" in entry:
                heads.append({"run": label, "timestep t": entry["timestep"],
                              **{name: entry.get(key) for key, name in HEAD_ALIGNMENT_COLUMNS.items()}})
    setup = next(iter(alignment.values()))["timesteps"][0]
    sections = [
        "<h2>Alignment with DINOv2</h2>",
        "<p>How close each run's U-Net features are to DINOv2's on a fixed held-out batch of validation images, at "
        "fixed timesteps, EMA weights: higher is closer, and a score means something only well above its "
        "<i>by chance</i> column (the same score with the DINOv2 side's images shuffled, mean over seeded "
        "shufflings: what unrelated features of the same structure would score).</p>",
        "<h3>U-Net features (every run)</h3>",
        "<p>CKNNA (mutual nearest-neighbour kernel alignment) and CCA compare the image-pooled features of the "
        "analysed layer, no head, so the baseline is comparable; CCA is fitted on one half of the images and scored "
        f"on the other ({setup.get('cca_fit_images')} + {setup.get('cca_scored_images')} images, PCA to "
        f"{setup.get('cca_pca_dims')} dimensions, mean of {setup.get('cca_components')} canonical correlations).</p>",
        _table(pd.DataFrame(features))]
    if heads:
        sections += ["<h3>Align head tokens (runs with a head)</h3>",
                     "<p>The align head's output tokens against DINOv2's: the mean per-token cosine similarity, and "
                     "CKNNA of the image-pooled tokens. The baseline has no head and no row.</p>",
                     _table(pd.DataFrame(heads))]
    return sections


def target_source(target_fid: float | None) -> str:
    """Where the FID-vs-step target comes from (`curves.curve_target`), in a few words (the plot's legend)."""
    return "evaluate.target_fid" if target_fid is not None else "the baseline's final curve FID"


def _target_text(target_fid: float | None) -> str:
    """`target_source` for the page: what the target is and why."""
    if target_fid is not None:
        return f"<code>evaluate.target_fid</code> = {target_fid:g}, set in the config"
    return ("the baseline's final FID-vs-step FID (mean over its seeds; <code>evaluate.target_fid</code> is null), "
            "so the speed-up below times each run to the quality the baseline ends at")


def fid_difference_note(metrics: dict[str, dict[int, dict]], curves: dict[str, dict], sweeps: dict[str, dict]) -> str:
    """One sentence on why the Ablations table's FID and the curve's last point differ for the same weights: the
    final sample set's sampler and image count against the curve's (the CFG sweep's sampler is the curve's)."""
    final = next(m for by_seed in metrics.values() for m in by_seed.values())
    curve_sampling = next(iter(sweeps.values()))["points"][0]["sampling"]
    curve_images = next((c["points"][0]["num_samples"] for c in curves.values() if c["points"]), None)
    final_sampler = f"{final['sampling']['sampler']} {final['sampling']['steps']} steps"
    curve_sampler = f"{curve_sampling['sampler']} {curve_sampling['steps']} steps"
    samplers = (f"the same sampler ({final_sampler})" if final_sampler == curve_sampler
                else f"{final_sampler} against the curve's {curve_sampler}")
    return (f"The Ablations table's FID and the curve's last point score the same final EMA weights but differ: the "
            f"table's final sample set has {final['num_generated']} images, each curve point {curve_images}, with "
            f"{samplers}, and FID depends on both (fewer images read higher), so compare FIDs within one table or "
            "plot, never across them.")


def samples_caption(tier: str, tier_source: str | None) -> list[str]:
    """What a sample grid shows, and, on a tier whose models are generated here, that its images tell nothing
    about the method."""
    text = ["<p>Each grid holds samples of the run's final EMA weights, one row per class (its prompt), the same "
            "seeds in every run: read a row across runs to compare what each fine-tune draws for that class.</p>"]
    if tier_source in GENERATED_SOURCES:
        text.append(f'<p class="warn">Tier {html.escape(tier)} runs on models generated here (source: '
                    f"{html.escape(tier_source)}), not on SD-1.5's and DINOv2's weights: its grids show what those "
                    "small models draw from the generated images, and tell nothing about U-REPA unless the models "
                    "were pre-trained; they check that sampling works.</p>")
    return text


def _probe_section(probes: dict[str, dict]) -> list[str]:
    """The "Linear probe" table: a row per probe.json (each run, the pretrained U-Net, DINOv2), then chance."""
    rows = [{"row": label, "features": p["layer"] if p["timestep"] is None else f"{p['layer']}, t = {p['timestep']}",
             "top-1": p["top1"], "train top-1": p["train_top1"], "probe images": p["train_images"],
             "validation images": p["val_images"], "converged": "yes" if p["converged"] else "no"}
            for label, p in probes.items()]
    first = next(iter(probes.values()))
    rows.append({"row": "chance", "features": f"1 / {first['classes']} classes", "top-1": first["chance"]})
    text = ("<p>Top-1 accuracy on the validation subset of a logistic regression (standardised features, "
            f"C = {first['C']:g}) fitted on a class-balanced probe set of train images: the U-Net's features of "
            "the aligned layer, pooled over space, for each image's latents noised to the timestep shown with the same "
            "seeded noise for every model, under the empty prompt. Read each row between chance (features that carry "
            "no class) and DINOv2's own pooled tokens (the ceiling alignment pulls towards), and each run against the "
            "pretrained U-Net it started from.</p>")
    return ["<h2>Linear probe</h2>", _table(pd.DataFrame(rows)), text]


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


# How soon each ablation reaches a quality, and at what training cost: fid.json's `convergence` and
# `training_cost`, and the report's "Speed-up to the target" section.


def device_label(launch: dict) -> str:
    """The hardware of one start of a run (a run.json `launches` entry): device name × processes (one device each)."""
    return f"{launch.get('device_name') or launch['device']} × {launch['processes']}"


def step_costs(train_log: str | Path, launches: list[dict]) -> pd.DataFrame:
    """Each training step's device-seconds: its logged wall time (train_log.csv's `step_time`: data, forward,
    backward and update; snapshots and checkpoints are not in it) times the processes of the launch that trained
    it, one device each; and that launch's `device_label`. `launches` is run.json's list of the run's starts, each
    with the step it resumed from: a step belongs to the last start before it, since a restart redoes the steps
    after its checkpoint and the log keeps the redone rows."""
    table = pd.read_csv(train_log)
    steps = table["step"].to_numpy()
    if not np.array_equal(steps, np.arange(1, len(steps) + 1)):
        raise ValueError(f"{train_log}: the steps are not 1, 2, ..., {len(steps)}: cannot sum the run's cost")
    if not launches:
        raise ValueError(f"no launches recorded for the run of {train_log}: cannot say what device trained it")
    launch_of_step = np.zeros(len(steps), dtype=int)
    for i, launch in enumerate(launches):
        launch_of_step[steps > launch["from_step"]] = i
    processes = np.array([launches[i]["processes"] for i in launch_of_step])
    return pd.DataFrame({"step": steps, "device_seconds": table["step_time"].to_numpy() * processes,
                         "device": [device_label(launches[i]) for i in launch_of_step]})


def model_step_costs(model_dir: str | Path) -> pd.DataFrame:
    """`step_costs` of an exported run folder: its train_log.csv, and the launches of its run.json (copied into
    config.json on export; a joint row's are in the run.json of the tuning run that trained it, which it costs)."""
    model_dir = Path(model_dir)
    config = json.loads((model_dir / "config.json").read_text())
    if "launches" in config:
        launches = config["launches"]
    else:
        tuning = json.loads((Path(config["joint"]) / "config.json").read_text())
        launches = json.loads((Path(tuning["run_state"]) / "run.json").read_text())["launches"]
    return step_costs(model_dir / "train_log.csv", launches)


def cost_to_step(costs: pd.DataFrame, step: float) -> float:
    """Device-seconds spent up to `step` (0 at step 0), linear within a step for an interpolated one."""
    if step > len(costs):
        raise ValueError(f"step {step} is past the {len(costs)} steps the run logged")
    cumulative = np.concatenate([[0.0], np.cumsum(costs["device_seconds"].to_numpy())])
    return float(np.interp(step, np.arange(len(cumulative)), cumulative))


def _cost_to_reach(costs: pd.DataFrame, reach: dict | None) -> float | None:
    """Device-seconds to a `steps_to_target` result's step; None where there is no step."""
    return None if reach is None or reach["step"] is None else cost_to_step(costs, reach["step"])


def training_cost(costs: dict[int, pd.DataFrame]) -> dict:
    """fid.json's `training_cost` of one ablation from `costs[seed]` (`step_costs`): each run's device-seconds,
    steps and hardware, and the device-seconds' mean ± std over seeds."""
    runs = {f"seed-{seed}": {"device_seconds": float(c["device_seconds"].sum()), "steps": len(c),
                             "device_seconds_per_step": float(c["device_seconds"].mean()),
                             "device": " + ".join(dict.fromkeys(c["device"]))}
            for seed, c in sorted(costs.items())}
    return {"device_seconds": spread([r["device_seconds"] for r in runs.values()]),
            "device": " + ".join(dict.fromkeys(r["device"] for r in runs.values())), "runs": runs}


def speedup(baseline: dict, run: dict, baseline_amount: float | None, run_amount: float | None) -> dict:
    """The baseline's steps (or cost) to a target over a run's: {"ratio", "bound"}, from both `steps_to_target`
    results. A curve already at the target at its first point reached it then or earlier, so its amount is an upper
    bound: the ratio is "at least" (the run's), "at most" (the baseline's), "undetermined" (both, no ratio) or
    "exact"; none when either never reaches it, or the run's pretrained step 0 already does."""
    if "not_reached" in (baseline["how"], run["how"]):
        return {"ratio": None, "bound": "not reached"}
    if run_amount == 0:
        return {"ratio": None, "bound": "pretrained at target"}
    bound = {(False, False): "exact", (False, True): "at least", (True, False): "at most",
             (True, True): "undetermined"}[baseline["how"] == "first_point", run["how"] == "first_point"]
    return {"ratio": None if bound == "undetermined" else baseline_amount / run_amount, "bound": bound}


def _ratio_spread(entries: list[tuple[int, dict]]) -> dict | None:
    """Mean ± std of the seed pairs' speed-ups that have a ratio, the seeds they come from, and their bound (one
    kind for all, else "mixed"); None when no pair has one."""
    kept = [(seed, entry) for seed, entry in entries if entry["ratio"] is not None]
    if not kept:
        return None
    bounds = {entry["bound"] for _, entry in kept}
    return {**spread([entry["ratio"] for _, entry in kept]), "seeds": [seed for seed, _ in kept],
            "bound": bounds.pop() if len(bounds) == 1 else "mixed"}


def convergence(curves: dict[str, dict[int, dict]], costs: dict[str, dict[int, pd.DataFrame]],
                target_fid: float | None) -> dict[str, dict]:
    """fid.json's additions per ablation, from `curves[ablation][seed]` (fid_curve.json) and `costs[ablation][seed]`
    (`step_costs`): `training_cost`, and `convergence`: the target (`curves.curve_target`), FID at every curve
    step (mean ± std over seeds) and its difference to the baseline paired by seed, each run's interpolated step
    and device-seconds to the target, and its speed-up against the baseline of the same seed, in steps and in
    device-seconds. A pair's target is the configured one, else that seed's baseline's own final curve FID, so
    the baseline always reaches it (at its final point at the latest)."""
    target = add_targets(curves, target_fid)
    steps = sorted({p["step"] for by_seed in curves.values() for c in by_seed.values() for p in c["points"]})
    fids = {a: {seed: {p["step"]: p["fid"] for p in c["points"]} for seed, c in by_seed.items()}
            for a, by_seed in curves.items()}
    baseline = curves.get("baseline", {})
    out = {}
    for ablation, by_seed in curves.items():
        runs, pairs = {}, []
        for seed, curve in sorted(by_seed.items()):
            reach = curve["steps_to_target"]
            run = {"fid_at_step": {str(s): f for s, f in fids[ablation][seed].items()}, "steps_to_target": reach,
                   "device_seconds_to_target": _cost_to_reach(costs[ablation][seed], reach)}
            if ablation != "baseline" and seed in baseline and baseline[seed]["points"]:
                pair_target = target_fid if target_fid is not None else baseline[seed]["points"][-1]["fid"]
                base_reach = steps_to_target(baseline[seed]["points"], pair_target)
                run_reach = steps_to_target(curve["points"], pair_target)
                base_cost = _cost_to_reach(costs["baseline"][seed], base_reach)
                run_cost = _cost_to_reach(costs[ablation][seed], run_reach)
                run["vs_baseline"] = {
                    "target_fid": pair_target, "baseline_steps_to_target": base_reach, "steps_to_target": run_reach,
                    "speedup": speedup(base_reach, run_reach, base_reach["step"], run_reach["step"]),
                    "compute_speedup": speedup(base_reach, run_reach, base_cost, run_cost)}
                pairs.append((seed, run["vs_baseline"]))
            runs[f"seed-{seed}"] = run
        at_step = {str(s): spread(values) for s in steps
                   if (values := [f[s] for f in fids[ablation].values() if s in f])}
        summary = {"target_fid": target, "steps": steps, "fid_at_step": at_step, "runs": runs}
        reached = [r["steps_to_target"]["step"] for r in runs.values()
                   if r["steps_to_target"] and r["steps_to_target"]["step"] is not None]
        summary["steps_to_target"] = spread(reached) if reached else None
        if ablation != "baseline" and baseline:
            summary["fid_vs_baseline_at_step"] = {}
            for s in steps:
                paired = sorted(seed for seed in fids[ablation] if s in fids[ablation][seed]
                                and s in fids.get("baseline", {}).get(seed, {}))
                if paired:
                    summary["fid_vs_baseline_at_step"][str(s)] = {
                        **spread([fids[ablation][seed][s] - fids["baseline"][seed][s] for seed in paired]),
                        "seeds": paired}
            summary["speedup"] = _ratio_spread([(seed, pair["speedup"]) for seed, pair in pairs])
            summary["compute_speedup"] = _ratio_spread([(seed, pair["compute_speedup"]) for seed, pair in pairs])
        out[ablation] = {"convergence": summary, "training_cost": training_cost(costs[ablation])}
    return out


def _reach_text(reach: dict | None) -> str:
    """A `steps_to_target` result as a table cell."""
    if reach is None:
        return "–"
    return {"interpolated": f"{reach['step']:.4g}", "at_point": f"{reach['step']:g} (a point)",
            "first_point": f"≤ {reach['step']:g} (first point)", "not_reached": "not reached"}[reach["how"]]


BOUND_SIGNS = {"exact": "", "at least": "≥ ", "at most": "≤ ", "mixed": ""}


def _speedup_text(entry: dict | None) -> str:
    """A pair's `speedup`, or their `_ratio_spread`, as a table cell: "≥" where the run was already at the target at
    its first point, "≤" where the baseline was."""
    if entry is None:
        return "–"
    if "mean" in entry:
        mixed = " (bounds mixed)" if entry["bound"] == "mixed" else ""
        return f"{BOUND_SIGNS[entry['bound']]}{_mean_std(entry)}×{mixed}"
    if entry["ratio"] is None:
        return entry["bound"]
    return f"{BOUND_SIGNS[entry['bound']]}{entry['ratio']:.4g}×"


def _speedup_cell(conv: dict, key: str) -> str:
    """An ablation's speed-up over its seed pairs; where no pair has a ratio, why not (the pairs' bounds)."""
    if conv.get(key):
        return _speedup_text(conv[key])
    bounds = {run["vs_baseline"][key]["bound"] for run in conv["runs"].values() if "vs_baseline" in run}
    return ", ".join(sorted(bounds)) or "–"


def _hours(summary: dict) -> dict:
    """A device-seconds `spread` in device-hours."""
    return {**summary, "mean": summary["mean"] / 3600, "std": None if summary["std"] is None else summary["std"] / 3600}


def cost_cells(fid: dict, ablation: str) -> dict:
    """The Ablations table's training-cost cell of one ablation (mean ± std over seeds, with the hardware)."""
    cost = fid[ablation]["training_cost"]
    return {"training cost (device-h)": f"{_mean_std(_hours(cost['device_seconds']))} ({cost['device']})"}


def convergence_section(fid: dict) -> list[str]:
    """The report's "Speed-up to the target" section from fid.json's `convergence` and `training_cost`."""
    conv = {a: entry["convergence"] for a, entry in fid.items() if "convergence" in entry}  # not `pretrained`
    several = any(len(c["runs"]) > 1 for c in conv.values())
    rows = []
    for ablation, c in conv.items():
        reaches = [r["steps_to_target"] for r in c["runs"].values()]
        costs = [r["device_seconds_to_target"] for r in c["runs"].values() if r["device_seconds_to_target"] is not None]
        if c["target_fid"] is None:
            at_target = "–"
        elif len(reaches) == 1:
            at_target = _reach_text(reaches[0])
        elif c["steps_to_target"]:
            at_target = f"{_mean_std(c['steps_to_target'])} ({c['steps_to_target']['n']} of {len(reaches)} reached)"
        else:
            at_target = "not reached"
        row = {"ablation": ablation, "seeds": len(c["runs"]), "target FID": c["target_fid"],
               "step at target": at_target, "device-h to target": _mean_std(_hours(spread(costs))) if costs else "–"}
        if ablation != "baseline":
            row["speed-up (steps)"] = _speedup_cell(c, "speedup")
            row["speed-up (device-s)"] = _speedup_cell(c, "compute_speedup")
        rows.append(row)
    steps = next(iter(conv.values()))["steps"]
    at_step = [{"ablation": a, **{str(s): _mean_std(c["fid_at_step"][str(s)]) if str(s) in c["fid_at_step"] else "–"
                                  for s in steps}} for a, c in conv.items()]
    deltas = [{"ablation": a, **{str(s): _mean_std(c["fid_vs_baseline_at_step"][str(s)])
                                 if str(s) in c["fid_vs_baseline_at_step"] else "–" for s in steps}}
              for a, c in conv.items() if "fid_vs_baseline_at_step" in c]
    sections = [
        "<h2>Speed-up to the target</h2>",
        "<p>Read the speed-up as how many times fewer training steps (or device-seconds) a run needs than the "
        "baseline of the same seed to reach that baseline's final FID-vs-step FID (or <code>evaluate.target_fid</code>"
        " when set): each step is interpolated linearly between the two curve points around the first crossing, "
        "≥ marks a run already at the target at its first point (so it got there then or sooner; <i>undetermined</i>"
        " when the baseline was too), and 2× means half the steps. The target FID and step-at-target columns use the "
        "tier's one target (the mean over the baseline's seeds); device-seconds are each step's measured time "
        "times its processes (training steps only: snapshots, checkpoints and sampling are not counted).</p>",
        _table(pd.DataFrame(rows))]
    if several:
        pair_rows = [{"run": f"{a} · {seed.replace('-', ' ')}", "target FID": p["target_fid"],
                      "baseline step": _reach_text(p["baseline_steps_to_target"]),
                      "step": _reach_text(p["steps_to_target"]), "speed-up (steps)": _speedup_text(p["speedup"]),
                      "speed-up (device-s)": _speedup_text(p["compute_speedup"])}
                     for a, c in conv.items() for seed, r in c["runs"].items() if (p := r.get("vs_baseline"))]
        sections += ["<h3>Seed pairs</h3>", _table(pd.DataFrame(pair_rows))]
    sections += ["<h3>FID at matched steps</h3>",
                 "<p>FID-vs-step FID at each curve step (columns; mean ± std over seeds): read a column down to "
                 "compare the ablations after the same number of steps.</p>", _table(pd.DataFrame(at_step))]
    if deltas:
        sections += ["<h3>ΔFID vs baseline at matched steps</h3>",
                     "<p>Each ablation's FID minus the baseline's at the same step, paired by seed (mean ± std over "
                     "the pairs); negative is better.</p>", _table(pd.DataFrame(deltas))]
    return sections
