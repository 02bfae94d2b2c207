"""Stage 1: the tier's per-class sample of the ILSVRC train or validation split."""
from urepa.runtime import setup_logging
from urepa.subset import build_subset, list_classes

setup_logging(snakemake.log[0])
build_subset(snakemake.input.imagenet, snakemake.params.images_per_class, snakemake.config["seed"],
             split=snakemake.params.split).to_csv(snakemake.output.csv, index=False)
if "classes" in snakemake.output.keys():
    list_classes(snakemake.input.imagenet).to_csv(snakemake.output.classes, index=False)
