"""Stage 2: one part of a VAE's posterior latents of the subset (cache_seal.py finishes the cache)."""
import json
from pathlib import Path

from urepa.caches import build_vae_cache
from urepa.runtime import resolve_device, set_threads, setup_logging

setup_logging(snakemake.log[0])
set_threads(snakemake.threads)
params, resources = snakemake.params, snakemake.resources
part = (int(snakemake.wildcards.part), int(snakemake.wildcards.parts))
folder = build_vae_cache(snakemake.input.csv, params.cache, Path(snakemake.input.vae_model) / params.vae_subfolder,
                         params.image_size, params.batch_size, resources.data_workers,
                         resolve_device(resources.device, resources.gpu), params.shard_rows, part,
                         vae_name=snakemake.wildcards.vae)
Path(snakemake.output[0]).write_text(json.dumps({"build_folder": str(folder), "part": part[0], "parts": part[1]}))
