"""Stage 6: results/summary.html, the tiers with results side by side."""
from pathlib import Path

from urepa.runtime import set_threads, setup_logging
from urepa.summary import render_summary

setup_logging(snakemake.log[0])
set_threads(snakemake.threads)
render_summary(list(snakemake.params.tiers), Path(snakemake.output[0]).parent, snakemake.output[0])
