"""A joint row's run folder: the U-Net trained inside a tuning run (urepa.vae_tuning.export_joint_model)."""
import logging

from urepa.runtime import set_threads, setup_logging
from urepa.vae_tuning import export_joint_model

setup_logging(snakemake.log[0])
set_threads(snakemake.threads)
export_joint_model(snakemake.input[0], snakemake.output[0])
logging.getLogger(__name__).info("run folder %s: the U-Net of %s", snakemake.output[0], snakemake.input[0])
