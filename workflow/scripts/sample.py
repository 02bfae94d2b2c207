"""Stage 4: sample one shard of a class-balanced set from fine-tuned weights (final EMA or a snapshot)."""
from pathlib import Path

import pandas as pd
import zarr

from urepa.digests import directory_digest
from urepa.export import load_finetuned_pipeline
from urepa.runtime import resolve_device, set_threads, setup_logging
from urepa.sample import generate_samples

setup_logging(snakemake.log[0])
set_threads(snakemake.threads)
params, resources, w = snakemake.params, snakemake.resources, snakemake.wildcards
clip = zarr.open_group(snakemake.input.clip, mode="r")
num_classes = len(pd.read_csv(snakemake.input.classes))
# decoded with the run's own VAE, or config's sample.decode_vae (then allowed to differ, with a warning)
pipe = load_finetuned_pipeline(snakemake.input.sd15, params.weights, resolve_device(resources.device, resources.gpu),
                               vae_dir=Path(snakemake.input.vae_model) / params.vae_subfolder,
                               vae_name=params.vae, allow_other_vae=params.allow_other_vae)
generate_samples(pipe, clip["embeddings"][:], clip.attrs["null_index"], num_classes, params.images_per_class,
                 snakemake.output[0], params.sampling, int(w.seed), params.batch_size,
                 weights_digest=directory_digest(params.weights), shards=int(w.shards), shard=int(w.shard),
                 vae=pipe.vae_record)
