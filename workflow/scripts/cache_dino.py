"""Stage 2: one part of the DINOv2 patch tokens of the subset (cache_seal.py finishes the cache)."""
import json
from pathlib import Path

from urepa.caches import build_dino_cache
from urepa.runtime import resolve_device, set_threads, setup_logging

setup_logging(snakemake.log[0])
set_threads(snakemake.threads)
params, resources = snakemake.params, snakemake.resources
part = (int(snakemake.wildcards.part), int(snakemake.wildcards.parts))
folder = build_dino_cache(snakemake.input.csv, params.cache, snakemake.input.dinov2, params.image_size,
                          params.dino_size, params.batch_size, resources.data_workers,
                          resolve_device(resources.device, resources.gpu), params.shard_rows, part)
Path(snakemake.output[0]).write_text(json.dumps({"build_folder": str(folder), "part": part[0], "parts": part[1]}))
