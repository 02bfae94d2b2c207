"""Generate the tier's ILSVRC-layout image tree."""
from urepa import generated
from urepa.runtime import set_threads, setup_logging

setup_logging(snakemake.log[0])
set_threads(snakemake.threads)
generated.make_imagenet_tree(snakemake.output[0], seed=snakemake.params.data_seed, **snakemake.params.spec)
