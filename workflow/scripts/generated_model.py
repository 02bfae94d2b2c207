"""Save one of the tier's random models (sd15, dinov2 or inception) in its real folder layout."""
from urepa import generated
from urepa.runtime import set_threads, setup_logging

setup_logging(snakemake.log[0])
set_threads(snakemake.threads)
generated.make_model(snakemake.wildcards.model, snakemake.output[0], snakemake.params.image_size,
                     snakemake.params.full_size, seed=snakemake.params.data_seed)
