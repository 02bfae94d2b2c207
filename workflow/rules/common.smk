# Config validation, the tier's input paths, and input functions shared by the stage rules.
import re
import sys
from pathlib import Path

sys.path.insert(0, workflow.basedir)  # the urepa package beside the Snakefile
from urepa import config as urepa_config
from urepa import runtime as urepa_runtime

SCHEMA = Path(workflow.basedir) / "workflow" / "schemas" / "config.schema.yaml"
urepa_config.apply_command_line(config, workflow.config_settings.config, SCHEMA)  # typed; the command line wins
urepa_config.validate(config, SCHEMA)
TIER = config["tier"]
ABLATION = config["ablation"]
urepa_config.train_settings(config, TIER, ABLATION)  # unknown tier or ablation: fail now, by name
urepa_config.check_real_paths(config, TIER)


onstart:
    # After the DAG is built and before any job starts (not on dry runs): one invocation per results folder.
    urepa_runtime.lock_results_folder("results")


def tier_of(wildcards):
    return urepa_config.tier_settings(config, wildcards.tier)


def data_dir(tier):
    """results/<tier>, or the tier whose subset and caches this tier reuses."""
    return f"results/{urepa_config.data_tier(config, tier)}"


def real_or_generated(key, folder):
    """Input function: the config path of a real tier, or the folder the workflow generates for a smoke or
    rehearsal tier (workflow/rules/generated.smk)."""

    def inputs(wildcards):
        if tier_of(wildcards)["source"] in urepa_config.GENERATED_SOURCES:
            return f"results/{wildcards.tier}/inputs/{folder}"
        return config[key]

    return inputs


imagenet_dir = real_or_generated("imagenet_dir", "imagenet")
sd15_dir = real_or_generated("sd15_dir", "sd15")
dinov2_path = real_or_generated("dinov2", "dinov2")
inception_path = real_or_generated("inception_dir", "inception")


def cache_paths(tier):
    root = data_dir(tier)
    return {
        "csv": f"{root}/subset.csv",
        "classes": f"{root}/classes.csv",
        "vae": f"{root}/cache/vae_latents.zarr",
        "dino": f"{root}/cache/dino_tokens.zarr",
        "clip": f"{root}/cache/clip_embeddings.zarr",
    }


wildcard_constraints:
    tier="|".join(config["tiers"]),
    ablation="|".join(map(re.escape, config["ablations"])),


def default_targets():
    return [f"results/{TIER}/report.html"]
