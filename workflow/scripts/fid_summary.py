"""Stage 6: results/<tier>/fid.json, the headline metrics of every compared run, and their spread over seeds."""
import json
from pathlib import Path

from urepa.report import fid_summary
from urepa.runtime import set_threads, setup_logging

setup_logging(snakemake.log[0])
set_threads(snakemake.threads)


def read(path):
    return json.loads(Path(path).read_text())


runs = snakemake.params.runs
metrics = {a: {seed: read(p["metrics"]) for seed, p in by_seed.items()} for a, by_seed in runs.items()}
sweeps = {a: {seed: read(p["cfg_sweep"]) for seed, p in by_seed.items()} for a, by_seed in runs.items()}
Path(snakemake.output[0]).write_text(json.dumps(fid_summary(metrics, sweeps), indent=2))
