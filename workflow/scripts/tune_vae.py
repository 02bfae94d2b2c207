"""Stage 3b: tune a VAE end to end through the alignment loss (REPA-E on SD-1.5); export it and the U-Net."""
from urepa.runtime import resolve_device, set_threads, setup_logging
from urepa.vae_tuning import tune_run

setup_logging(snakemake.log[0])
set_threads(snakemake.threads)
params, resources, inputs = snakemake.params, snakemake.resources, snakemake.input
tune_run({name: inputs[name] for name in ("csv", "vae", "dino", "clip")}, inputs.sd15, inputs.dinov2,
         inputs.vgg16[0] if inputs.vgg16 else None, params.unet_settings, params.tune, snakemake.wildcards.vae,
         params.states_dir, snakemake.output[0], params.tune["seed"], resolve_device(resources.device, resources.gpu),
         resources.data_workers, params.image_size, params.dino_size, params.lpips_seed)
