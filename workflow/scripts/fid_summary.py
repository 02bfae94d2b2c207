"""Stage 6: results/<tier>/fid.json, the headline metrics of every compared ablation."""
import json
from pathlib import Path

from urepa.report import fid_summary
from urepa.runtime import setup_logging

setup_logging(snakemake.log[0])
metrics = {ablation: json.loads(Path(path).read_text()) for ablation, path in snakemake.input.items()}
Path(snakemake.output[0]).write_text(json.dumps(fid_summary(metrics), indent=2))
