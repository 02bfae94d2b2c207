"""Generate the smoke tier's ILSVRC-layout image tree."""
from urepa import smoke
from urepa.runtime import setup_logging

setup_logging(snakemake.log[0])
tier = snakemake.params.tier
smoke.make_imagenet_tree(snakemake.output[0], tier["smoke_classes"], tier["smoke_train_images"],
                         tier["smoke_val_images"], seed=snakemake.config["seed"])
