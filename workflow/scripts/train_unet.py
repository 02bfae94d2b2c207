"""Stage 3: train one (tier, ablation) run and export its weights, on train.processes processes."""
from urepa.config import train_settings
from urepa.launch import train
from urepa.runtime import resolve_device

config, w = snakemake.config, snakemake.wildcards
# The rule's params.settings without processes and grad_accum, which change no result: changing them reruns nothing.
settings = train_settings(config, w.tier, w.ablation)
caches = {name: snakemake.input[name] for name in ("csv", "vae", "dino", "clip")}
train(dict(caches=caches, sd15_dir=snakemake.input.sd15, dinov2_path=snakemake.input.dinov2, settings=settings,
           states_dir=snakemake.params.states_dir, model_dir=snakemake.output.model, seed=int(w.seed),
           device=str(resolve_device(config["device"], snakemake.resources.gpu)), num_workers=config["num_workers"],
           title=f"{w.tier} / {w.ablation}", image_size=snakemake.params.image_size,
           dino_size=snakemake.params.dino_size, report_to=config["report_to"]),
      snakemake.threads, snakemake.log[0])
