"""Stage 2: seal a cache its part jobs have built: check every row, write the metadata, move it into place."""
from urepa.rowstore import seal_cache
from urepa.runtime import setup_logging

setup_logging(snakemake.log[0])
seal_cache(snakemake.output[0])
