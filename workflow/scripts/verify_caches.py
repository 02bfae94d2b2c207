"""Read every cache of the tier whole against its checksums (urepa.rowstore.verify_cache)."""
import json
from pathlib import Path

from urepa.rowstore import verify_cache
from urepa.runtime import set_threads, setup_logging

setup_logging(snakemake.log[0])
set_threads(snakemake.threads)
caches = [*snakemake.input.vae, snakemake.input.dino, snakemake.input.clip]
for cache in caches:
    verify_cache(cache)
Path(snakemake.output[0]).write_text(json.dumps({"verified": caches}, indent=2))
