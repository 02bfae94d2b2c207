"""Stage 5: FID, sFID, KID, IS, precision/recall of a sample folder against the tier's reference."""
import json
from pathlib import Path

from urepa.evaluate import score_samples
from urepa.export import is_pretrained
from urepa.feature_networks import build_feature_network
from urepa.runtime import resolve_device, set_threads, setup_logging

setup_logging(snakemake.log[0])
set_threads(snakemake.threads)
params, resources = snakemake.params, snakemake.resources
sampling = json.loads((Path(snakemake.input.samples) / "sampling.json").read_text())
step = params.checkpoint_step
pretrained = is_pretrained(snakemake.input.model)  # SD-1.5 as it is: step 0, not EMA weights
if step is None:  # the final EMA weights
    step = 0 if pretrained else json.loads((Path(snakemake.input.model) / "config.json").read_text())["final_step"]
inception = snakemake.input.inception  # [folder] for clean-fid's Inception, [] for the stand-in
network = build_feature_network(params.network, inception[0] if inception else None,
                                resolve_device(resources.device, resources.gpu))
weights = "pretrained" if pretrained else "EMA"
result = score_samples(snakemake.input.samples, snakemake.input.reference, network, params.batch_size,
                       {"sampling": sampling, "checkpoint_step": step, "weights": weights})
Path(snakemake.output[0]).write_text(json.dumps(result, indent=2))
