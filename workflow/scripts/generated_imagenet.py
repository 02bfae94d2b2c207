"""Generate the tier's ILSVRC-layout image tree."""
from urepa import generated
from urepa.runtime import setup_logging

setup_logging(snakemake.log[0])
generated.make_imagenet_tree(snakemake.output[0], seed=snakemake.params.data_seed, **snakemake.params.spec)
