"""Stage 5: t-SNE, CCA and CKNNA of the run's U-Net features against DINOv2 on held-out images."""
import json
from pathlib import Path

import pandas as pd
import zarr

from urepa.analysis import alignment_analysis
from urepa.runtime import resolve_device, set_threads, setup_logging

setup_logging(snakemake.log[0])
set_threads(snakemake.threads)
params, resources = snakemake.params, snakemake.resources
classes = pd.read_csv(snakemake.input.classes)
result = alignment_analysis(
    snakemake.input.csv, snakemake.input.sd15, snakemake.input.dinov2, Path(snakemake.input.model) / "ema",
    zarr.open_group(snakemake.input.clip, mode="r")["embeddings"][:], params.image_size, params.dino_size,
    params.images, params.timesteps, params.data_seed, resolve_device(resources.device, resources.gpu),
    snakemake.output.tsne, params.batch_size, vae_dir=Path(snakemake.input.vae_model) / params.vae_subfolder,
    class_names=dict(zip(classes["class_id"].tolist(), classes["name"].tolist())))
Path(snakemake.output.scores).write_text(json.dumps(result, indent=2))
