"""Save the smoke tier's tiny random SD-1.5 pipeline and DINOv2 in their real folder layouts."""
from urepa import smoke
from urepa.runtime import setup_logging

setup_logging(snakemake.log[0])
seed = snakemake.config["seed"]
smoke.make_tiny_sd15(snakemake.output.sd15, snakemake.params.image_size, seed=seed)
smoke.make_tiny_dinov2(snakemake.output.dinov2, seed=seed)
