"""Stage 5: one run's metrics against the guidance scale, gathered."""
import json
from pathlib import Path

from urepa.curves import cfg_sweep
from urepa.runtime import set_threads, setup_logging

setup_logging(snakemake.log[0])
set_threads(snakemake.threads)
Path(snakemake.output[0]).write_text(json.dumps(cfg_sweep(list(snakemake.input)), indent=2))
