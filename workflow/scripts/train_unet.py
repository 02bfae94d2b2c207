"""Stage 3: train one (tier, ablation) run and export its weights."""
from urepa.runtime import resolve_device, set_threads, setup_logging
from urepa.train import train_run

setup_logging(snakemake.log[0])
set_threads(snakemake.threads)
config, w = snakemake.config, snakemake.wildcards
caches = {name: snakemake.input[name] for name in ("csv", "vae", "dino", "clip")}
train_run(caches, snakemake.input.sd15, snakemake.input.dinov2, snakemake.params.settings, snakemake.params.states_dir,
          snakemake.output.model, int(w.seed), resolve_device(config["device"], snakemake.resources.gpu), config["num_workers"],
          title=f"{w.tier} / {w.ablation}", image_size=snakemake.params.image_size,
          dino_size=snakemake.params.dino_size, report_to=config["report_to"])
