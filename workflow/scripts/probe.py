"""Stage 5: the linear probe of a run's EMA weights, or of the references (SD-1.5's U-Net as it is, and DINOv2)."""
import json
from pathlib import Path

import zarr

from urepa.probe import probe_dinov2, probe_unet
from urepa.runtime import resolve_device, set_threads, setup_logging

setup_logging(snakemake.log[0])
set_threads(snakemake.threads)
params, resources, inputs, outputs = snakemake.params, snakemake.resources, snakemake.input, snakemake.output
device = resolve_device(resources.device, resources.gpu)
clip = zarr.open_group(inputs.clip, mode="r")
null_embedding = clip["embeddings"][clip.attrs["null_index"]]
common = dict(image_size=params.image_size, settings=params.settings, seed=params.data_seed, device=device,
              batch_size=params.batch_size)
if "model" in inputs.keys():  # a run
    result = probe_unet(inputs.csv, inputs.val_csv, inputs.sd15, Path(inputs.model) / "ema",
                        Path(inputs.vae_model) / params.vae_subfolder, inputs.latents, inputs.dino, null_embedding,
                        **common)
    Path(outputs[0]).write_text(json.dumps(result, indent=2))
else:  # the references: the pretrained U-Net (on SD-1.5's VAE) and DINOv2's own features
    pretrained = probe_unet(inputs.csv, inputs.val_csv, inputs.sd15, None, Path(inputs.sd15) / "vae", inputs.latents,
                            inputs.dino, null_embedding, layer=params.layer, **common)
    Path(outputs.pretrained).write_text(json.dumps(pretrained, indent=2))
    dinov2 = probe_dinov2(inputs.csv, inputs.val_csv, inputs.dinov2, inputs.latents, inputs.dino,
                          dino_size=params.dino_size, **common)
    Path(outputs.dinov2).write_text(json.dumps(dinov2, indent=2))
