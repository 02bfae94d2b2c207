"""Stage 6: the tier's report page and its FID-vs-step and CFG-sweep figures."""
import json
import tempfile
from pathlib import Path

from urepa.config import PRETRAINED
from urepa.curves import add_targets
from urepa.plots import plot_cfg_sweeps, plot_fid_curves, plot_losses, term_weights
from urepa.report import by_label, render_report, target_source
from urepa.runtime import set_threads, setup_logging

setup_logging(snakemake.log[0])
set_threads(snakemake.threads)
params = snakemake.params
runs = {a: {seed: {**paths, "loss_curve": f"{paths['loss_curve']}/loss_curve.png"} for seed, paths in by_seed.items()}
        for a, by_seed in params.runs.items()}
curves = {a: {seed: json.loads(Path(p["curve"]).read_text()) for seed, p in by_seed.items()}
          for a, by_seed in runs.items()}
sweeps = {a: {seed: json.loads(Path(p["cfg_sweep"]).read_text()) for seed, p in by_seed.items()}
          for a, by_seed in runs.items()}
network = json.loads(Path(next(iter(by_label(runs).values()))["metrics"]).read_text())["feature_network"]
add_targets(curves, params.target_fid)
plot_fid_curves(by_label(curves), snakemake.output.curves, target_source(params.target_fid), network)
pretrained_sweep = json.loads(Path(snakemake.input.pretrained_sweep).read_text())
plot_cfg_sweeps({PRETRAINED: pretrained_sweep, **by_label(sweeps)}, snakemake.output.sweep, network)
reconstructions = {Path(path).parent.name: json.loads(Path(path).read_text()) for path in snakemake.input.recon}
probes = {label: json.loads(Path(paths["probe"]).read_text()) for label, paths in by_label(runs).items()}
probes["pretrained"] = json.loads(Path(snakemake.input.probe_pretrained).read_text())
probes["DINOv2 (ceiling)"] = json.loads(Path(snakemake.input.probe_dinov2).read_text())
with tempfile.TemporaryDirectory() as figures:
    # each run's losses redrawn with its terms' weights, so a term that is off is marked off (the page embeds them)
    for a, by_seed in runs.items():
        for seed, paths in by_seed.items():
            paths["loss_curve"] = Path(figures) / f"{a}-seed-{seed}-losses.png"
            plot_losses(Path(params.runs[a][seed]["loss_curve"]) / "train_log.csv", paths["loss_curve"],
                        f"{a}, seed {seed}", term_weights(params.settings[a]))
    render_report(snakemake.wildcards.tier, runs, curves, sweeps, snakemake.output.curves, snakemake.output.sweep,
                  snakemake.output.html, params.vaes, reconstructions,
                  json.loads(Path(snakemake.input.fid).read_text()), probes=probes, settings=params.settings,
                  target_fid=params.target_fid, tier_source=params.tier_source, pretrained_sweep=pretrained_sweep,
                  comparison_grid_png=snakemake.input.comparison_grid)
