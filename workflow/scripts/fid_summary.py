"""Stage 6: results/<tier>/fid.json, the headline metrics of every compared run (and of SD-1.5 as it is), and their
spread over seeds; how soon each reaches the target FID, and its training cost."""
import json
from pathlib import Path

from urepa.config import PRETRAINED
from urepa.report import convergence, fid_summary, model_step_costs
from urepa.runtime import set_threads, setup_logging

setup_logging(snakemake.log[0])
set_threads(snakemake.threads)


def read(path):
    return json.loads(Path(path).read_text())


runs = snakemake.params.runs
metrics = {a: {seed: read(p["metrics"]) for seed, p in by_seed.items()} for a, by_seed in runs.items()}
sweeps = {a: {seed: read(p["cfg_sweep"]) for seed, p in by_seed.items()} for a, by_seed in runs.items()}
curves = {a: {seed: read(p["curve"]) for seed, p in by_seed.items()} for a, by_seed in runs.items()}
costs = {a: {seed: model_step_costs(p["loss_curve"]) for seed, p in by_seed.items()} for a, by_seed in runs.items()}
# SD-1.5 as it is, at the chosen seed: the reference row (no curve of its own, no training cost)
pretrained, seed = snakemake.params.pretrained, snakemake.params.seed
summary = fid_summary({PRETRAINED: {seed: read(pretrained["metrics"])}, **metrics},
                      {PRETRAINED: {seed: read(pretrained["cfg_sweep"])}, **sweeps})
for ablation, additions in convergence(curves, costs, snakemake.params.target_fid).items():
    summary[ablation].update(additions)
Path(snakemake.output[0]).write_text(json.dumps(summary, indent=2))
