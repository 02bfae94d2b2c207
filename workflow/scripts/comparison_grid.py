"""Stage 4: the tier's same-noise comparison grid, from the final sample sets of the pretrained model and each
compared ablation (chosen seed)."""
import pandas as pd

from urepa.runtime import set_threads, setup_logging
from urepa.sample_sets import comparison_grid

setup_logging(snakemake.log[0])
set_threads(snakemake.threads)
folders = [snakemake.input.pretrained, *snakemake.input.runs]
comparison_grid(dict(zip(snakemake.params.columns, folders, strict=True)), snakemake.output[0],
                pd.read_csv(snakemake.input.classes)["name"].tolist(), snakemake.params.rows)
