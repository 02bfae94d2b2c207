"""Stage 2: SD-VAE posterior latents of the subset."""
from urepa.caches import build_vae_cache
from urepa.runtime import resolve_device, set_threads, setup_logging

setup_logging(snakemake.log[0])
set_threads(snakemake.threads)
config = snakemake.config
build_vae_cache(snakemake.input.csv, snakemake.output[0], snakemake.input.sd15, snakemake.params.image_size,
                config["cache"]["batch_size"], config["num_workers"], resolve_device(config["device"], snakemake.resources.gpu))
