"""Stage 3: train one (tier, ablation) run and export its weights, on train.processes processes."""
from pathlib import Path

from urepa.config import speed_settings
from urepa.launch import train
from urepa.runtime import resolve_device

params, resources, w = snakemake.params, snakemake.resources, snakemake.wildcards
# params.settings leaves out processes, grad_accum and the speed options, which change no result (changing them reruns
# nothing): they come back from the rule's resources.
settings = {**params.settings, "processes": resources.processes, "grad_accum": resources.grad_accum,
            **speed_settings(resources.speed)}
caches = {name: snakemake.input[name] for name in ("csv", "vae", "dino", "clip")}
train(dict(caches=caches, sd15_dir=snakemake.input.sd15, dinov2_path=snakemake.input.dinov2,
           vae_dir=str(Path(snakemake.input.vae_model) / params.vae_subfolder), settings=settings,
           states_dir=params.states_dir, model_dir=snakemake.output.model, seed=int(w.seed),
           device=str(resolve_device(resources.device, resources.gpu)), num_workers=resources.data_workers,
           title=f"{w.tier} / {w.ablation}", image_size=params.image_size, dino_size=params.dino_size,
           report_to=resources.report_to),
      snakemake.threads, snakemake.log[0])
