"""Stage 2: CLIP embeddings of every class prompt and the empty prompt."""
from urepa.caches import build_clip_cache
from urepa.runtime import resolve_device, set_threads, setup_logging

setup_logging(snakemake.log[0])
set_threads(snakemake.threads)
build_clip_cache(snakemake.input.classes, snakemake.output[0], snakemake.input.sd15,
                 resolve_device(snakemake.resources.device, snakemake.resources.gpu))
