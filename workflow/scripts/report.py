"""Stage 6: the tier's report page and its FID-vs-step figure."""
import json
from pathlib import Path

from urepa.evaluate import add_targets
from urepa.report import plot_fid_curves, render_report
from urepa.runtime import setup_logging

setup_logging(snakemake.log[0])
runs = {a: {**paths, "loss_curve": f"{paths['loss_curve']}/loss_curve.png"} for a, paths in snakemake.params.runs.items()}
curves = {a: json.loads(Path(p["curve"]).read_text()) for a, p in runs.items()}
add_targets(curves, snakemake.params.target_fid)
plot_fid_curves(curves, snakemake.output.curves)
render_report(snakemake.wildcards.tier, runs, curves, snakemake.output.curves, snakemake.output.html)
