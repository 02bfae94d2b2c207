# Config validation, the tier's input paths, and input functions shared by the stage rules.
import re
import sys
from pathlib import Path

sys.path.insert(0, workflow.basedir)  # the urepa package beside the Snakefile
from urepa import config as urepa_config
from urepa import runtime as urepa_runtime
from urepa.config import check_shard_rows
from urepa.sample_sets import shard_count

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
    """The caches every VAE shares (`latent_cache` holds each VAE's own)."""
    root = data_dir(tier)
    return {
        "csv": f"{root}/subset.csv",
        "classes": f"{root}/classes.csv",
        "dino": f"{root}/cache/dino_tokens.zarr",
        "clip": f"{root}/cache/clip_embeddings.zarr",
    }


def latent_cache(tier, vae):
    return f"{data_dir(tier)}/cache/{vae}/vae_latents.zarr"


def run_vae(wildcards):
    """The VAE a run trains on (its `train.vae`); SD-1.5's own for the pretrained model."""
    if wildcards.ablation == urepa_config.PRETRAINED:
        return urepa_config.SD15_VAE
    return urepa_config.train_settings(config, wildcards.tier, wildcards.ablation)["vae"]


def decode_vae(wildcards):
    """The VAE a run's samples are decoded with: its own, unless config's `sample.decode_vae` names another."""
    return config["sample"]["decode_vae"] or run_vae(wildcards)


def vae_model(wildcards, name):
    """The folder an input function gives for VAE `name`: the SD-1.5 folder for `sd15` (jobs read its vae/,
    `vae_subfolder`), a tuned VAE's tune_vae output (its vae/), else config's `vaes` path or, on a generated tier,
    the stand-in it generates."""
    if name == urepa_config.SD15_VAE:
        return sd15_dir(wildcards)
    if name in urepa_config.tuned_vaes(config):
        return tuned_vae_dir(wildcards.tier, name)
    if tier_of(wildcards)["source"] in urepa_config.GENERATED_SOURCES:
        return f"results/{wildcards.tier}/inputs/vaes/{name}"
    return config["vaes"][name]


def vae_subfolder(name):
    return "vae" if name == urepa_config.SD15_VAE or name in urepa_config.tuned_vaes(config) else ""


def tuned_vae_dir(tier, name):
    """tune_vae's output for tuned VAE `name`: vae/ (the AutoencoderKL), unet/ (the U-Net trained alongside), logs."""
    return f"results/{tier}/vae/{name}/tuned"


wildcard_constraints:
    tier="|".join(config["tiers"]),
    seed="[0-9]+",
    point=r"curve/step-[0-9]+|cfg_sweep/cfg-[0-9]+(\.[0-9]+)?",
    set=r"final|curve/step-[0-9]+|cfg_sweep/cfg-[0-9]+(\.[0-9]+)?",
    shard="[0-9]+",
    shards="[0-9]+",
    ablation="|".join(map(re.escape, [*config["ablations"], urepa_config.PRETRAINED])),
    vae="|".join(map(re.escape, [urepa_config.SD15_VAE, *config["vaes"], *urepa_config.tuned_vaes(config)])),


# Input functions of the stage rules.


def inception_dir(wildcards):
    """clean-fid's Inception folder (from config, or the rehearsal tier's generated one); none for the
    stand-in network."""
    return [inception_path(wildcards)] if tier_of(wildcards)["feature_network"] == "inception" else []


def preset(wildcards, key):
    """The sampler settings of the tier's `sample_preset` or `curve_preset`."""
    return config["sample"]["presets"][tier_of(wildcards)[key]]


def curve_steps(tier, ablation):
    """Training steps with an EMA snapshot: every eval_interval, and the last step (a joint row: its tuning run's
    last step only)."""
    joint = urepa_config.joint_ablations(config)
    if ablation in joint:
        return [urepa_config.tune_settings(config, tier, joint[ablation])["max_steps"]]
    settings = urepa_config.train_settings(config, tier, ablation)
    steps = set(range(settings["eval_interval"], settings["max_steps"] + 1, settings["eval_interval"]))
    return sorted(steps | {settings["max_steps"]})


def cfg_scales(tier):
    """The guidance scales of the tier's CFG sweep."""
    return urepa_config.tier_settings(config, tier).get("cfg_sweep", config["sample"]["cfg_sweep"])


def scale_name(scale):
    return f"{float(scale):g}"


def cfg_point_metrics(wildcards, scale):
    """The metrics.json of a run's CFG-sweep point. At the curve sampler's own scale that point is the run's last
    FID-vs-step point (step 0 for the pretrained model): the same EMA weights (the last snapshot is the final EMA),
    sampler, initial noise and image count, so those images are drawn and scored once."""
    run = f"results/{wildcards.tier}/{wildcards.ablation}/seed-{wildcards.seed}"
    if float(scale) == float(preset(wildcards, "curve_preset")["cfg_scale"]):
        pretrained = wildcards.ablation == urepa_config.PRETRAINED
        last = 0 if pretrained else curve_steps(wildcards.tier, wildcards.ablation)[-1]
        return f"{run}/curve/step-{last:07d}/metrics.json"
    return f"{run}/cfg_sweep/cfg-{scale_name(scale)}/metrics.json"


def sample_set(name):
    """(kind, value) of a run's sample set: ("final", None), an FID-vs-step point ("step", 40) or a CFG-sweep
    point ("cfg", 4.5)."""
    if name == "final":
        return "final", None
    kind, _, value = name.rpartition("-")
    return ("step", int(value)) if kind == "curve/step" else ("cfg", float(value))


def set_sampling(wildcards):
    kind, value = sample_set(wildcards.set)
    sampling = dict(preset(wildcards, "sample_preset" if kind == "final" else "curve_preset"))
    if kind == "cfg":
        sampling["cfg_scale"] = value
    return sampling


def set_weights(wildcards):
    kind, value = sample_set(wildcards.set)
    model = f"results/{wildcards.tier}/{wildcards.ablation}/seed-{wildcards.seed}/model"
    if wildcards.ablation == urepa_config.PRETRAINED:  # one folder for every set: SD-1.5 as it is
        return model
    return f"{model}/snapshots/step-{value:07d}" if kind == "step" else f"{model}/ema"


def set_images_per_class(wildcards, name):
    return tier_of(wildcards)["sample_images_per_class" if name == "final" else "curve_images_per_class"]


def set_resources(wildcards):
    """The `resources` entry of a sample set's jobs: `sample` for the final set, `sample_point` for the others."""
    return "sample" if wildcards.set == "final" else "sample_point"


def shard_dirs(wildcards, name):
    """The shard folders of sample set `name`: the tier's `sample_shards` (else `sample.shards`) jobs over index
    ranges, fewer when the set has fewer batches."""
    classes = urepa_config.known_class_count(config, wildcards.tier)
    per_class = set_images_per_class(wildcards, name)
    shards = shard_count(classes and classes * per_class, config["sample"]["batch_size"],
                         tier_of(wildcards).get("sample_shards", config["sample"]["shards"]))
    run = f"results/{wildcards.tier}/{wildcards.ablation}/seed-{wildcards.seed}"
    return [f"{run}/shards/{name}/{shard}-of-{shards}" for shard in range(shards)]


def compared(tier):
    return urepa_config.compared(config, tier)


def seeds():
    """The training seeds of every compared run: `seeds`, with the chosen `seed` added when absent."""
    return list(dict.fromkeys([*config["seeds"], config["seed"]]))


def run_outputs(tier):
    """{ablation: {seed: {output: path}}} of every run the tier's report compares."""
    return {
        a: {
            seed: {
                "metrics": f"results/{tier}/{a}/seed-{seed}/metrics.json",
                "curve": f"results/{tier}/{a}/seed-{seed}/fid_curve.json",
                "cfg_sweep": f"results/{tier}/{a}/seed-{seed}/cfg_sweep.json",
                "alignment": f"results/{tier}/{a}/seed-{seed}/alignment.json",
                "probe": f"results/{tier}/{a}/seed-{seed}/probe.json",
                "loss_curve": f"results/{tier}/{a}/seed-{seed}/model",
                "tsne": f"results/{tier}/{a}/seed-{seed}/tsne.png",
                "grid": f"results/{tier}/{a}/seed-{seed}/sample_grid.png",
            }
            for seed in seeds()
        }
        for a in compared(tier)
    }


def pretrained_outputs(tier):
    """The outputs of SD-1.5 as it is (rule pretrained_model), once per tier at the chosen `seed`, so its noise is
    that seed's runs' noise: the final set's metrics and CFG sweep (the reference row), the curve point every
    FID-vs-step curve starts from (step 0), and the final samples (the comparison grid's first column)."""
    run = f"results/{tier}/{urepa_config.PRETRAINED}/seed-{config['seed']}"
    return {"metrics": f"{run}/metrics.json", "cfg_sweep": f"{run}/cfg_sweep.json",
            "curve_point": f"{run}/curve/step-{0:07d}/metrics.json", "samples": f"{run}/samples"}


def run_files(tier, *keys):
    """The paths of `keys` of every compared run (all keys when none given)."""
    return [path for runs in run_outputs(tier).values() for run in runs.values()
            for key, path in run.items() if not keys or key in keys]


def rule_resources(rule_name, wildcards):
    """A model rule's resources on the job's tier: config `resources`, then the tier's `all`, then the tier's
    entry for the rule; `rule_name` is a name, or a function of the wildcards giving one."""
    name = rule_name if isinstance(rule_name, str) else rule_name(wildcards)
    tier = tier_of(wildcards).get("resources", {})
    return {**config["resources"][name], **tier.get("all", {}), **tier.get(name, {})}


def job_gpus(rule_name, wildcards):
    """GPUs of one job: train_unet and tune_vae ask for one per training process."""
    if rule_name == "train_unet":
        per_job = urepa_config.train_settings(config, wildcards.tier, wildcards.ablation)["processes"]
    elif rule_name == "tune_vae":
        per_job = urepa_config.tune_unet_settings(config, wildcards.tier, wildcards.vae)["processes"]
    else:
        per_job = 1
    return rule_resources(rule_name, wildcards)["gpu"] * per_job


def job_threads(rule_name):
    """The rule's `threads`: cpus_per_gpu for each of its GPUs (at least one)."""
    return lambda w: rule_resources(rule_name, w)["cpus_per_gpu"] * max(1, job_gpus(rule_name, w))


def job_resources(rule_name):
    """The rule's `resources`: what it asks of the machine, in the names Snakemake's Slurm executor reads (runtime in
    minutes; memory for each of its GPUs, at least one), and how its script runs there (`device`, `data_workers`).

    Settings that change no result are resources, not params: Snakemake reruns a job whose params changed, and a
    new `num_workers` must not resample a tier. What a rule computes from is in its params."""
    return {"gpu": lambda w: job_gpus(rule_name, w),
            "mem_mb": lambda w: rule_resources(rule_name, w)["mem_mb"] * max(1, job_gpus(rule_name, w)),
            "runtime": lambda w: rule_resources(rule_name, w)["runtime"],
            "cpus_per_task": lambda w, threads: threads,
            "device": config["device"], "data_workers": config["num_workers"]}


def cache_settings(tier):
    """config's `cache`, with the tier's own `cache` keys over it."""
    return {**config["cache"], **urepa_config.tier_settings(config, tier).get("cache", {})}


def probe_settings(wildcards):
    """config's `probe`, with the tier's own `probe` keys over it."""
    return {**config["probe"], **tier_of(wildcards).get("probe", {})}


_cache = cache_settings(urepa_config.data_tier(config, TIER))
check_shard_rows(_cache["shard_rows"], _cache["batch_size"])  # a shard size that splits a batch: before any job


def cache_parts(name):
    """Input function of a sealing rule: the markers of every part job of cache `name` (a pattern of the rule's
    wildcards, e.g. "{vae}/vae_latents")."""

    def inputs(wildcards):
        parts = cache_settings(wildcards.tier)["shards"]
        cache = name.format(**dict(wildcards.items()))
        return [f"results/{wildcards.tier}/cache/{cache}.parts/{part}-of-{parts}.json" for part in range(parts)]

    return inputs


def default_targets():
    # the summary over tiers reads a few JSON files: cheap enough to come with every run
    return [f"results/{TIER}/report.html", "results/summary.html"]
