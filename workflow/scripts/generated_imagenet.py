"""Generate the smoke tier's ILSVRC-layout image tree."""
from urepa import smoke
from urepa.runtime import setup_logging

setup_logging(snakemake.log[0])
params = snakemake.params
smoke.make_imagenet_tree(snakemake.output[0], params.classes, params.train_images, params.val_images,
                         seed=snakemake.config["seed"])
