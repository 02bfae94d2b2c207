"""results/summary.html: one page over the tiers, each tier's headline table and figures beside the others', each
linking to the tier's own report.html. A module of its own, not a section of urepa.report: it reads the finished
fid.json of several tiers, not one tier's run files, and writes a page outside every tier's folder."""
from __future__ import annotations

import html
import json
import logging
import os
from pathlib import Path

import pandas as pd

from .digests import file_digest
from .plots import is_stand_in

log = logging.getLogger(__name__)

# Each tier's figures, linked from the page (they sit beside the tier's report.html).
TIER_FIGURES = (("fid_curve.png", "FID vs training step"), ("cfg_sweep.png", "CFG sweep"))


def tiers_with_results(results: str | Path, named: list[str] | None, current: str) -> dict[str, str | None]:
    """The tiers the summary shows, in order, each with the SHA-256 of its fid.json: `named` (config
    `summary_tiers`) when given, else every `results/<tier>/fid.json` on disk, plus `current`, the tier being run.
    The summary rule's params: the digests rebuild the page when another tier's results change. `current`'s
    fid.json is the rule's input (built in this run, tracked by Snakemake) and a tier without one has none: None."""
    results = Path(results)
    tiers = list(named) if named is not None else sorted(p.parent.name for p in results.glob("*/fid.json"))
    if current not in tiers:
        tiers.append(current)
    return {tier: file_digest(results / tier / "fid.json")
            if tier != current and (results / tier / "fid.json").exists() else None for tier in tiers}


def _mean_std(summary: dict | None) -> str:
    if not summary:
        return "–"
    return f"{summary['mean']:.4g}" if summary.get("std") is None else f"{summary['mean']:.4g} ± {summary['std']:.2g}"


def tier_rows(fid: dict) -> list[dict]:
    """A tier's headline table from its fid.json: per ablation the seeds, FID and sFID (mean ± std), ΔFID to the
    baseline paired by seed, the best CFG-sweep FID, and where fid.json has them, the speed-up to the target and
    the training cost. Entries that are not ablation summaries (no `fid`) are left out."""
    rows = []
    for ablation, entry in fid.items():
        if not isinstance(entry, dict) or "fid" not in entry:
            continue
        runs = entry.get("runs", {}).values()
        best = [r["cfg_sweep_best"]["fid"] for r in runs if r.get("cfg_sweep_best")]
        row = {"ablation": ablation, "seeds": len(entry.get("seeds", [])), "FID": _mean_std(entry["fid"]),
               "sFID": _mean_std(entry.get("sfid")), "ΔFID vs baseline": _mean_std(entry.get("fid_vs_baseline")),
               "best-CFG FID": f"{min(best):.4g}" if best else "–"}
        convergence = entry.get("convergence", {})
        if convergence.get("speedup"):
            row["speed-up (steps)"] = f"{_mean_std(convergence['speedup'])}×"
        if "training_cost" in entry:
            row["training cost (device-h)"] = f"{entry['training_cost']['device_seconds']['mean'] / 3600:.3g}"
        rows.append(row)
    return rows


def _feature_networks(fid: dict) -> set[str]:
    return {r.get("feature_network") for entry in fid.values() if isinstance(entry, dict)
            for r in entry.get("runs", {}).values() if r.get("feature_network")}


def _tier_section(tier: str, tier_dir: Path, page_dir: Path) -> list[str]:
    fid = json.loads((tier_dir / "fid.json").read_text())
    link = os.path.relpath(tier_dir / "report.html", page_dir)
    networks = _feature_networks(fid)
    parts = [f'<section><h2>{html.escape(tier)}</h2><p><a href="{html.escape(link)}">the full report of tier '
             f"{html.escape(tier)}</a> · feature network: {html.escape(', '.join(sorted(networks)) or 'unknown')}</p>"]
    if any(is_stand_in(n) for n in networks):
        parts.append('<p class="warn">Stand-in feature network: these scores test the pipeline and are not '
                     "comparable to published FIDs or to another tier's.</p>")
    rows = tier_rows(fid)
    parts.append(pd.DataFrame(rows).to_html(index=False, border=0, classes="t", na_rep="–") if rows
                 else "<p>fid.json holds no ablation.</p>")
    for name, title in TIER_FIGURES:
        if (tier_dir / name).exists():
            src = html.escape(os.path.relpath(tier_dir / name, page_dir))
            parts.append(f'<figure><a href="{src}"><img src="{src}" alt="{html.escape(tier)} {title}"></a>'
                         f"<figcaption>{title}</figcaption></figure>")
    parts.append("</section>")
    return parts


def render_summary(tiers: list[str], results: str | Path, out_html: str | Path) -> list[str]:
    """The summary page of `tiers` (`results/<tier>/fid.json` each), one section per tier side by side; a tier
    without a fid.json is skipped, with a note in the log and on the page. Returns the tiers shown."""
    results, out_html = Path(results), Path(out_html)
    shown, skipped, sections = [], [], []
    for tier in tiers:
        if not (results / tier / "fid.json").exists():
            log.info("summary: tier %s skipped: %s has no results yet", tier, results / tier / "fid.json")
            skipped.append(tier)
            continue
        sections += _tier_section(tier, results / tier, out_html.parent)
        shown.append(tier)
    note = (f"<p>Skipped (no fid.json yet): {html.escape(', '.join(skipped))}.</p>" if skipped else "")
    intro = ("<p>Each tier's headline table from its fid.json (FID of the final sample set, mean ± std over seeds; "
             "ΔFID against the baseline paired by seed, negative is better) and its FID-vs-step and CFG-sweep figures, "
             "one column per tier. Compare ablations within a tier: tiers differ in data, models, sampler and feature "
             "network, so their FIDs are not comparable with each other. Within a tier, the table's FID (the final "
             "sample set) and the curve's last point (the curve sampler, fewer images) score the same weights yet "
             "differ: compare FIDs within the table or within the plot. Each tier's link opens its full report.</p>")
    style = ("body{font-family:sans-serif;margin:2em;color:#222}.tiers{display:flex;flex-wrap:wrap;gap:2em;"
             "align-items:flex-start}section{flex:1 1 560px;max-width:900px;overflow-x:auto}img{max-width:100%}"
             "figure{margin:1em 0}table.t{border-collapse:collapse;font-size:.9em}"
             "table.t td,table.t th{padding:3px 8px;border-bottom:1px solid #ddd;text-align:right}"
             ".warn{background:#fff3cd;padding:.5em 1em}")
    out_html.write_text(f"<!doctype html><html><head><meta charset='utf-8'><title>urepa: summary</title>"
                        f"<style>{style}</style></head><body><h1>urepa: summary over tiers</h1>{intro}{note}"
                        f"<div class='tiers'>{''.join(sections)}</div></body></html>")
    log.info("summary of tiers %s written to %s", ", ".join(shown) or "(none)", out_html)
    return shown
