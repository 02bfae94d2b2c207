"""Stage 3b: tune a VAE end to end through the alignment loss (REPA-E on SD-1.5); export it and the U-Net, on
train.processes processes."""
from urepa.config import speed_settings
from urepa.launch import train
from urepa.runtime import resolve_device

params, resources, inputs = snakemake.params, snakemake.resources, snakemake.input
# params.unet_settings leaves out processes (and grad_accum) and the speed options, which change no result: they
# come back here.
unet_settings = {**params.unet_settings, "processes": resources.processes, "grad_accum": 1,
                 **speed_settings(resources.speed)}
train(dict(caches={name: inputs[name] for name in ("csv", "vae", "dino", "clip")}, sd15_dir=inputs.sd15,
           dinov2_path=inputs.dinov2, vgg16=inputs.vgg16[0] if inputs.vgg16 else None, unet_settings=unet_settings,
           tune=params.tune, vae_name=snakemake.wildcards.vae, states_dir=params.states_dir,
           out_dir=snakemake.output[0], seed=params.tune["seed"],
           device=str(resolve_device(resources.device, resources.gpu)), num_workers=resources.data_workers,
           image_size=params.image_size, dino_size=params.dino_size, lpips_seed=params.lpips_seed),
      snakemake.threads, snakemake.log[0], stage="tune_vae")
