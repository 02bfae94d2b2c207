"""Stage 6: the tier's report page and its FID-vs-step and CFG-sweep figures."""
import json
from pathlib import Path

from urepa.curves import add_targets
from urepa.plots import plot_cfg_sweeps, plot_fid_curves
from urepa.report import by_label, render_report
from urepa.runtime import set_threads, setup_logging

setup_logging(snakemake.log[0])
set_threads(snakemake.threads)
runs = {a: {seed: {**paths, "loss_curve": f"{paths['loss_curve']}/loss_curve.png"} for seed, paths in by_seed.items()}
        for a, by_seed in snakemake.params.runs.items()}
curves = {a: {seed: json.loads(Path(p["curve"]).read_text()) for seed, p in by_seed.items()} for a, by_seed in runs.items()}
sweeps = {a: {seed: json.loads(Path(p["cfg_sweep"]).read_text()) for seed, p in by_seed.items()}
          for a, by_seed in runs.items()}
add_targets(curves, snakemake.params.target_fid)
plot_fid_curves(by_label(curves), snakemake.output.curves)
plot_cfg_sweeps(by_label(sweeps), snakemake.output.sweep)
reconstructions = {Path(path).parent.name: json.loads(Path(path).read_text()) for path in snakemake.input.recon}
probes = {label: json.loads(Path(paths["probe"]).read_text()) for label, paths in by_label(runs).items()}
probes["pretrained"] = json.loads(Path(snakemake.input.probe_pretrained).read_text())
probes["DINOv2 (ceiling)"] = json.loads(Path(snakemake.input.probe_dinov2).read_text())
render_report(snakemake.wildcards.tier, runs, curves, sweeps, snakemake.output.curves, snakemake.output.sweep,
              snakemake.output.html, snakemake.params.vaes, reconstructions,
              json.loads(Path(snakemake.input.fid).read_text()), probes=probes, settings=snakemake.params.settings)
