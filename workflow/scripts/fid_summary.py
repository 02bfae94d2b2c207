"""Stage 6: results/<tier>/fid.json, the headline metrics of every compared ablation."""
import json
from pathlib import Path

from urepa.report import fid_summary
from urepa.runtime import setup_logging

setup_logging(snakemake.log[0])
runs = snakemake.params.runs
metrics = {a: json.loads(Path(paths["metrics"]).read_text()) for a, paths in runs.items()}
sweeps = {a: json.loads(Path(paths["cfg_sweep"]).read_text()) for a, paths in runs.items()}
Path(snakemake.output[0]).write_text(json.dumps(fid_summary(metrics, sweeps), indent=2))
