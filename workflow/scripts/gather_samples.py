"""Stage 4: join the shards of one sample set into its samples/ folder, and draw its grid."""
import pandas as pd

from urepa.runtime import set_threads, setup_logging
from urepa.sample_sets import gather_samples, sample_grid

setup_logging(snakemake.log[0])
set_threads(snakemake.threads)
gather_samples(snakemake.input.shards, snakemake.output.samples)
sample_grid(snakemake.output.samples, snakemake.output.grid, snakemake.params.images_per_class,
            pd.read_csv(snakemake.input.classes)["name"].tolist())
