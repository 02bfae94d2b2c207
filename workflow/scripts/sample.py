"""Stage 4: sample a class-balanced set from fine-tuned weights (final EMA or a snapshot)."""
import pandas as pd
import zarr

from urepa.caches import directory_digest
from urepa.runtime import resolve_device, set_threads, setup_logging
from urepa.sample import generate_samples, load_finetuned_pipeline, sample_grid

setup_logging(snakemake.log[0])
set_threads(snakemake.threads)
config, params = snakemake.config, snakemake.params
clip = zarr.open_group(snakemake.input.clip, mode="r")
class_names = pd.read_csv(snakemake.input.classes)["name"].tolist()
pipe = load_finetuned_pipeline(snakemake.input.sd15, params.weights, params.settings["finetune"],
                               resolve_device(config["device"], snakemake.resources.gpu))
generate_samples(pipe, clip["embeddings"][:], clip.attrs["null_index"], len(class_names), params.images_per_class,
                 snakemake.output.samples, params.sampling, int(snakemake.wildcards.seed),
                 config["sample"]["batch_size"], weights_digest=directory_digest(params.weights))
sample_grid(snakemake.output.samples, snakemake.output.grid, params.images_per_class, class_names)
