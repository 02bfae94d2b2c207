"""Stage 1: the tier's per-class sample of the ILSVRC train or validation split."""
from urepa.runtime import set_threads, setup_logging
from urepa.subset import build_subset, choose_classes, list_classes

setup_logging(snakemake.log[0])
set_threads(snakemake.threads)
seed, num_classes = snakemake.params.data_seed, snakemake.params.classes
build_subset(snakemake.input.imagenet, snakemake.params.images_per_class, seed, split=snakemake.params.split,
             num_classes=num_classes).to_csv(snakemake.output.csv, index=False)
if "classes" in snakemake.output.keys():
    choose_classes(list_classes(snakemake.input.imagenet), num_classes, seed).to_csv(snakemake.output.classes,
                                                                                     index=False)
