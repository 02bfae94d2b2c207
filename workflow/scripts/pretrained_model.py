"""Stage 3: the weights folder of SD-1.5 as it is (no fine-tuned weights), sampled and scored like a run's."""
from pathlib import Path

from urepa.export import save_pretrained_description
from urepa.runtime import set_threads, setup_logging
from urepa.vae import vae_record

setup_logging(snakemake.log[0])
set_threads(snakemake.threads)
params = snakemake.params
save_pretrained_description(snakemake.output[0], snakemake.input.sd15,
                            vae_record(params.vae, Path(snakemake.input.vae_model) / params.vae_subfolder))
