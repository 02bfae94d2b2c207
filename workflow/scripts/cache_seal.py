"""Stage 2: seal a cache its part jobs have built: check every row, write the metadata, move it into place."""
from urepa.rowstore import seal_cache
from urepa.runtime import set_threads, setup_logging

setup_logging(snakemake.log[0])
set_threads(snakemake.threads)
seal_cache(snakemake.output[0])
