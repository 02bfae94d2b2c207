"""Stage 5: one run's FID-vs-step points, gathered."""
import json
from pathlib import Path

from urepa.curves import fid_curve
from urepa.runtime import set_threads, setup_logging

setup_logging(snakemake.log[0])
set_threads(snakemake.threads)
Path(snakemake.output[0]).write_text(json.dumps(fid_curve(list(snakemake.input)), indent=2))
