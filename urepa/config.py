"""Configuration: schema validation with readable errors, and the per-tier view of the config."""
from __future__ import annotations

import difflib
import json
from pathlib import Path
from typing import Any

import jsonschema
import yaml


class ConfigError(ValueError):
    """A config value is wrong; the message names the key and what was expected."""


def load_yaml(path: str | Path) -> dict:
    with open(path) as f:
        return yaml.safe_load(f)


def _key_path(error: jsonschema.ValidationError) -> str:
    return ".".join(str(p) for p in error.absolute_path) or "<top level>"


def _describe(error: jsonschema.ValidationError) -> str:
    where = _key_path(error)
    if error.validator == "additionalProperties":
        allowed = sorted(error.schema.get("properties", {}))
        unknown = sorted(set(error.instance) - set(allowed))
        lines = []
        for key in unknown:
            hint = difflib.get_close_matches(key, allowed, n=1)
            suggestion = f" (did you mean '{hint[0]}'?)" if hint else ""
            lines.append(f"config key '{where}.{key}' is not a known key{suggestion}".replace("<top level>.", ""))
        if allowed:
            lines.append(f"known keys here: {', '.join(allowed)}")
        return "; ".join(lines)
    return f"config key '{where}': {error.message}"


def apply_command_line(config: dict, command_line: dict, schema_path: str | Path) -> None:
    """Type and rank the `--config` values Snakemake has merged into `config`, in place.

    Snakemake reads nested command-line values (`--config 'train={max_steps: 500}'`) as strings: each string
    where the schema wants a number, boolean, null, list or object is read as YAML. And the command line wins:
    precedence, lowest first, is config.yaml's `train`, the tier's `train`, the ablation's preset, the command
    line. A `train` key given on the command line is therefore removed from the tier blocks and ablation
    presets that set it (otherwise they would silently win), unless the command line set it there too."""
    schema = load_yaml(schema_path)
    _type_strings(config, schema, [])
    for path in _leaf_paths(command_line.get("train", {})):
        for tier, settings in config.get("tiers", {}).items():
            if _get(command_line, ["tiers", tier, "train", *path]) is None:
                _drop(settings.get("train", {}), path)
        for name, preset in config.get("ablations", {}).items():
            if _get(command_line, ["ablations", name, *path]) is None:
                _drop(preset, path)


def _type_strings(node, schema: dict, path: list[str]) -> None:
    items = node.items() if isinstance(node, dict) else enumerate(node) if isinstance(node, list) else ()
    for key, value in list(items):
        where = [*path, str(key)] if isinstance(node, dict) else [*path, "[]"]
        if isinstance(value, str):
            node[key] = _typed(value, _schema_at(schema, where))
        else:
            _type_strings(value, schema, where)


def _leaf_paths(mapping: dict, prefix: tuple = ()) -> list[list[str]]:
    paths = []
    for key, value in mapping.items():
        if isinstance(value, dict) and value:
            paths += _leaf_paths(value, (*prefix, key))
        else:
            paths.append([*prefix, key])
    return paths


def _get(mapping, path: list[str]):
    for part in path:
        if not isinstance(mapping, dict) or part not in mapping:
            return None
        mapping = mapping[part]
    return mapping


def _schema_at(schema: dict, path: list[str]) -> dict:
    """The schema of the value at `path` ("[]": a list item; {} where the schema does not say: validation
    reports it)."""
    node = schema
    for part in path:
        while "$ref" in node:
            node = schema["$defs"][node["$ref"].rsplit("/", 1)[-1]]
        if part == "[]":
            node = node.get("items", {})
        else:
            node = node.get("properties", {}).get(part) or node.get("additionalProperties") or {}
        if not isinstance(node, dict):
            return {}
    while "$ref" in node:
        node = schema["$defs"][node["$ref"].rsplit("/", 1)[-1]]
    return node


def _typed(value, node: dict):
    """A string from the command line read as YAML where the schema wants a number, boolean, null, list or
    object; left as it is where a string is allowed."""
    kinds = node.get("type", [])
    kinds = [kinds] if isinstance(kinds, str) else kinds
    if isinstance(value, str) and "string" not in kinds and "enum" not in node:
        return yaml.safe_load(value)
    return value


def _drop(mapping: dict, path: list[str]) -> None:
    for part in path[:-1]:
        mapping = mapping.get(part)
        if not isinstance(mapping, dict):
            return
    mapping.pop(path[-1], None)


def validate(config: dict, schema_path: str | Path) -> None:
    """Validate against the JSON schema; raise ConfigError naming every offending key."""
    schema = load_yaml(schema_path)
    validator = jsonschema.Draft202012Validator(schema)
    errors = sorted(validator.iter_errors(config), key=lambda e: list(e.absolute_path))
    if errors:
        raise ConfigError("invalid configuration:\n  " + "\n  ".join(_describe(e) for e in errors))
    _check_names(config)


def _check_names(config: dict) -> None:
    """Names that refer to other config entries must exist."""
    problems = []
    if config["tier"] not in config["tiers"]:
        problems.append(f"config key 'tier': unknown tier '{config['tier']}'; "
                        f"defined tiers: {', '.join(config['tiers'])}")
    for key, names in [("ablation", [config["ablation"]]), ("compare", config["compare"]),
                       *((f"tiers.{tier}.compare", s.get("compare", [])) for tier, s in config["tiers"].items())]:
        for name in names:
            if name not in config["ablations"]:
                problems.append(f"config key '{key}': unknown ablation '{name}'; "
                                f"defined ablations: {', '.join(config['ablations'])}")
    for tier, settings in config["tiers"].items():
        for key in ("sample_preset", "curve_preset"):
            if settings[key] not in config["sample"]["presets"]:
                problems.append(f"config key 'tiers.{tier}.{key}': unknown preset '{settings[key]}'; "
                                f"defined presets: {', '.join(config['sample']['presets'])}")
        if settings.get("data_from", tier) not in config["tiers"]:
            problems.append(f"config key 'tiers.{tier}.data_from': unknown tier '{settings['data_from']}'")
    if PRETRAINED in config["ablations"]:
        problems.append(f"config key 'ablations.{PRETRAINED}': '{PRETRAINED}' is the name of SD-1.5 as it is (every "
                        f"report's reference row and each curve's step 0); give the ablation another name")
    clashes = sorted(set(config["vaes"]) & set(tuned_vaes(config)))
    if clashes:
        problems.append(f"config keys 'vaes' and 'vae_tune.presets' both define {', '.join(clashes)}: a VAE name "
                        f"is either a local folder or one the workflow tunes")
    for ablation, name in config["vae_tune"]["joint_ablations"].items():
        if ablation not in config["ablations"] or name not in config["vae_tune"]["presets"]:
            problems.append(f"config key 'vae_tune.joint_ablations.{ablation}': needs an ablation '{ablation}' and a "
                            f"tuned VAE '{name}' under vae_tune.presets")
        elif config["ablations"][ablation].get("vae") != name:
            problems.append(f"config key 'ablations.{ablation}.vae' must be '{name}': its U-Net is the one trained "
                            f"beside that VAE (vae_tune.joint_ablations)")
    known_vaes = [SD15_VAE, *config["vaes"], *tuned_vaes(config)]
    named_vaes = [("train.vae", config["train"]["vae"]), ("sample.decode_vae", config["sample"]["decode_vae"]),
                  *((f"tiers.{tier}.train.vae", s.get("train", {}).get("vae")) for tier, s in config["tiers"].items()),
                  *((f"ablations.{name}.vae", preset.get("vae")) for name, preset in config["ablations"].items())]
    for key, name in named_vaes:
        if name is not None and name not in known_vaes:
            problems.append(f"config key '{key}': unknown VAE '{name}'; known VAEs: {', '.join(known_vaes)} "
                            f"(add a local AutoencoderKL folder under `vaes:`, or a preset under `vae_tune.presets`)")
    if problems:
        raise ConfigError("invalid configuration:\n  " + "\n  ".join(problems))


def tier_settings(config: dict, tier: str | None = None) -> dict[str, Any]:
    """The settings of one tier, with a clear error for an unknown tier name."""
    tier = tier or config["tier"]
    if tier not in config["tiers"]:
        raise ConfigError(f"config key 'tier': unknown tier '{tier}'; defined tiers: {', '.join(config['tiers'])}")
    return config["tiers"][tier]


def tuned_vaes(config: dict) -> list[str]:
    """The VAEs the workflow tunes itself (rule tune_vae): the names under `vae_tune.presets`."""
    return list(config["vae_tune"]["presets"])


def tune_settings(config: dict, tier: str, name: str) -> dict[str, Any]:
    """Settings of tuned VAE `name`: `vae_tune`'s defaults, then the tier's `vae_tune`, then the preset's."""
    if name not in config["vae_tune"]["presets"]:
        raise ConfigError(f"no tuned VAE '{name}'; vae_tune.presets: {', '.join(tuned_vaes(config))}")
    defaults = {key: value for key, value in config["vae_tune"].items() if key not in ("presets", "joint_ablations")}
    return _merge(_merge(defaults, tier_settings(config, tier).get("vae_tune", {})),
                  config["vae_tune"]["presets"][name])


def joint_ablations(config: dict) -> dict[str, str]:
    """{ablation: tuned VAE} of the rows whose U-Net is the one trained inside that VAE's tuning run."""
    return dict(config["vae_tune"]["joint_ablations"])


def tune_unet_settings(config: dict, tier: str, name: str) -> dict[str, Any]:
    """The U-Net side of tuning run `name`: the tier's `urepa` training settings on SD-1.5's VAE (the VAE tuning
    starts from), on the tier's `train.processes` processes without accumulation, for the tuning run's steps and
    batch."""
    tune = tune_settings(config, tier, name)
    return _resolved({**_merged_train(config, tier, "urepa"), "vae": SD15_VAE, "grad_accum": 1,
                      "max_steps": tune["max_steps"], "batch_size": tune["batch_size"]}, tier, "urepa")


def compared(config: dict, tier: str) -> list[str]:
    """The ablations a tier's report compares: its `compare` list (else the global one), with the chosen `ablation`
    added when absent."""
    names = tier_settings(config, tier).get("compare", config["compare"])
    return list(dict.fromkeys([*names, config["ablation"]]))


# The row name of SD-1.5 as it is, sampled once per tier at the chosen `seed`: the final table's reference row and
# every FID-vs-step curve's step 0 (results/<tier>/pretrained/); never an ablation's name.
PRETRAINED = "pretrained"
# The VAE name of SD-1.5's own `vae/` folder (urepa.vae.SD15_VAE; repeated here so config stays free of torch).
SD15_VAE = "sd15"


def tier_vaes(config: dict, tier: str) -> list[str]:
    """The VAEs in use on a tier: those of the runs it compares (`sd15` first when used)."""
    names = {train_settings(config, tier, ablation)["vae"] for ablation in compared(config, tier)}
    return sorted(names, key=lambda name: (name != SD15_VAE, name))


def known_class_count(config: dict, tier: str) -> int | None:
    """The tier's number of classes where the config says it (`classes: N`, or a generated tier's tree); None for
    every class of a real ImageNet folder, counted only by the subset stage."""
    settings = tier_settings(config, tier)
    return settings.get("classes") or settings.get("generated", {}).get("classes")


def data_tier(config: dict, tier: str) -> str:
    """The tier whose subset and caches this tier trains on (tierC reuses tierB's)."""
    data_from = tier_settings(config, tier).get("data_from", tier)
    if data_from != tier:
        tier_settings(config, data_from)
    return data_from


# Tier sources whose inputs the workflow generates under results/<tier>/inputs/: tiny models (smoke) or the
# real architectures with random weights (rehearsal). Any other source (imagenet) reads config's paths.
GENERATED_SOURCES = ("smoke", "rehearsal")

REAL_TIER_PATHS = {
    "imagenet_dir": "an ILSVRC root holding Data/CLS-LOC/train/<synset>/*.JPEG",
    "sd15_dir": "a diffusers stable-diffusion-v1-5 folder with unet/ vae/ text_encoder/ tokenizer/ scheduler/",
    "dinov2": "a transformers DINOv2 folder (config.json + weights) or an original dinov2_vit*14*.pth file",
}


INCEPTION_FILE = "inception-2015-12-05.pt"


def _layout_problems(config: dict) -> list[str]:
    """What is missing inside the real-tier paths that are set and exist: caught before any job, not
    hours into one. (Unset or absent paths are reported by `check_real_paths` itself.)"""
    paths = {key: Path(config[key]) for key in REAL_TIER_PATHS if config.get(key) and Path(config[key]).exists()}
    found = {}
    if "imagenet_dir" in paths and not (paths["imagenet_dir"] / "Data" / "CLS-LOC" / "train").is_dir():
        found["imagenet_dir"] = "has no Data/CLS-LOC/train folder"
    if "sd15_dir" in paths:
        from .sd15 import SD15_SUBFOLDERS  # torch: only when a real tier names an SD-1.5 folder

        missing = [name + "/" for name in SD15_SUBFOLDERS if not (paths["sd15_dir"] / name).is_dir()]
        if missing:
            found["sd15_dir"] = f"lacks {', '.join(missing)}"
    dinov2 = paths.get("dinov2")
    if dinov2 and not ((dinov2 / "config.json").is_file() or (dinov2.is_file() and dinov2.suffix == ".pth")):
        found["dinov2"] = "is neither a folder with config.json nor a .pth file"
    elif dinov2 and (problem := _dinov2_content_problem(dinov2)):
        found["dinov2"] = problem
    return [f"config key '{key}': '{paths[key]}' {problem}; expected {REAL_TIER_PATHS[key]}"
            for key, problem in found.items()]


def _vae_problems(config: dict, tier: str) -> list[str]:
    """Every VAE other than SD-1.5's that the tier's runs train on or decode with: set, and an AutoencoderKL folder
    of 4-channel, f8 latents (sd15's own vae/ is checked with sd15_dir)."""
    from .vae import check_vae_dir  # torch: only on a real tier

    problems = []
    for name in dict.fromkeys([*tier_vaes(config, tier), config["sample"]["decode_vae"] or SD15_VAE]):
        if name == SD15_VAE or name in tuned_vaes(config):  # tuned VAEs are made by the workflow
            continue
        key = f"vaes.{name}"
        if not config["vaes"].get(name):
            problems.append(f"config key '{key}' is not set; tier '{tier}' trains on VAE '{name}' (a local diffusers "
                            f"AutoencoderKL folder)")
            continue
        try:
            check_vae_dir(config["vaes"][name], f"config key '{key}'")
        except (OSError, ValueError) as error:
            problems.append(str(error))
    return problems


def _dinov2_content_problem(path: Path) -> str | None:
    """Open what the `dinov2` key names, cheaply (a memory-mapped checkpoint, a JSON config), so that a file
    merely named like a checkpoint fails here, in one line, not hours later in a pile of tracebacks."""
    if path.is_dir():
        try:
            model_type = json.loads((path / "config.json").read_text()).get("model_type")
        except (OSError, ValueError) as error:
            return f"has a config.json that is not readable JSON ({error})"
        if model_type not in ("dinov2", "dinov2_with_registers"):
            return f"has a config.json of model_type {model_type!r}, not a DINOv2"
        return None
    import torch

    try:
        state = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
    except Exception as error:  # pickle, zip and format errors alike: the file is not a checkpoint
        return f"is not a readable PyTorch checkpoint ({type(error).__name__}: {str(error).splitlines()[0][:200]})"
    if not isinstance(state, dict) or "patch_embed.proj.weight" not in state:
        return "is a PyTorch file but holds no DINOv2 weights (no patch_embed.proj.weight)"
    return None


def check_real_paths(config: dict, tier: str) -> None:
    """Fail before any job starts when a real tier's local input is not where config says. Tiers that
    generate their inputs (smoke, rehearsal) read none of these paths."""
    if tier_settings(config, tier)["source"] in GENERATED_SOURCES:
        return
    problems = []
    for key, expected in REAL_TIER_PATHS.items():
        value = config.get(key)
        if not value:
            problems.append(f"config key '{key}' is not set; tier '{tier}' needs {expected}")
        elif not Path(value).exists():
            problems.append(f"config key '{key}': path '{value}' does not exist; expected {expected}")
    problems += _layout_problems(config)
    problems += _vae_problems(config, tier)
    vgg16 = config.get("vgg16")
    if not vgg16 or not Path(vgg16).is_file():
        found = "it is not set" if not vgg16 else f"{vgg16} is not a file"
        problems.append(f"config key 'vgg16': LPIPS (recon_eval, tune_vae) needs torchvision's VGG16 ImageNet "
                        f"weights file (vgg16-397923af.pth); {found} (nothing is downloaded)")
    if tier_settings(config, tier)["feature_network"] == "inception":
        weights = Path(config.get("inception_dir") or "<inception_dir>") / INCEPTION_FILE
        if not weights.is_file():
            problems.append(f"config key 'inception_dir': FID needs clean-fid's Inception weights; put "
                            f"{INCEPTION_FILE} at {weights} (nothing is downloaded)")
    if problems:
        raise ConfigError("missing inputs for tier '" + tier + "':\n  " + "\n  ".join(problems))


def _merge(base: dict, override: dict) -> dict:
    merged = dict(base)
    for key, value in override.items():
        merged[key] = _merge(base[key], value) if isinstance(value, dict) and isinstance(base.get(key), dict) else value
    return merged


# `train` keys that say how a run is executed, not what it computes (the results agree to floating-point
# reordering: tests/test_train_distributed.py). They stay out of the run's identity and of the train rule's
# params, so a run resumes on another number of GPUs, and changing them reruns nothing.
# The speed options (tests/test_train.py: a run with each on ends within float noise of one with it off) are launch
# keys too: a run resumes with them changed, and the rule hands them over as its `speed` resource.
SPEED_KEYS = ("tf32", "fused_adamw", "compile", "channels_last", "pin_memory")
LAUNCH_KEYS = ("processes", "grad_accum") + SPEED_KEYS


def speed_resource(settings: dict) -> str:
    """The speed options that are on, as one resource value ('tf32+pin_memory'; 'none')."""
    return "+".join(key for key in SPEED_KEYS if settings[key]) or "none"


def speed_settings(resource: str) -> dict[str, bool]:
    """`speed_resource`'s inverse: every speed key, on or off."""
    named = set() if resource == "none" else set(resource.split("+"))
    unknown = named - set(SPEED_KEYS)
    if unknown:
        raise ConfigError(f"resource 'speed': unknown speed option(s) {sorted(unknown)}; "
                          f"known: {', '.join(SPEED_KEYS)}")
    return {key: key in named for key in SPEED_KEYS}


def without_launch(settings: dict) -> dict:
    return {key: value for key, value in settings.items() if key not in LAUNCH_KEYS}


def train_settings(config: dict, tier: str, ablation: str) -> dict[str, Any]:
    """Training settings of one run: defaults, then the tier's overrides, then the ablation's; a cutoff given as a
    share of the run (`align_schedule.cutoff_fraction`) resolved to its step."""
    return _resolved(_merged_train(config, tier, ablation), tier, ablation)


def _merged_train(config: dict, tier: str, ablation: str) -> dict[str, Any]:
    if ablation not in config["ablations"]:
        raise ConfigError(f"config key 'ablation': unknown ablation '{ablation}'; "
                          f"defined ablations: {', '.join(config['ablations'])}")
    settings = _merge(_merge(config["train"], tier_settings(config, tier).get("train", {})),
                      config["ablations"][ablation])
    if settings["learning_rate"] is None:
        settings["learning_rate"] = 2e-4 if settings["finetune"] == "lora" else 1e-4
    return settings


def _resolved(settings: dict, tier: str, ablation: str) -> dict[str, Any]:
    """`cutoff_fraction` as `cutoff_step` = round(fraction x max_steps), against the run's own max_steps (so a
    HASTE-style cutoff holds on every tier, and a run set by step or by share of the same step is the same run);
    and the combinations that cannot mean what they say refused, naming the keys."""
    where = f"ablation '{ablation}' on tier '{tier}'"
    schedule = dict(settings["align_schedule"])
    fraction = schedule.pop("cutoff_fraction", None)
    if fraction is not None:
        if schedule.get("cutoff_step") is not None:
            raise ConfigError(f"config keys 'train.align_schedule.cutoff_step' ({schedule['cutoff_step']}) and "
                              f"'train.align_schedule.cutoff_fraction' ({fraction}) are both set for {where}: "
                              f"set one (null the other)")
        schedule["cutoff_step"] = round(fraction * settings["max_steps"])
    if (settings["target_spatial_norm"] == 1 and settings["manifold_mode"] == "sample"
            and settings["manifold_coeff"] > 0):
        # alpha = 1 removes each channel's mean over the image: every pooled target row is zero
        raise ConfigError(f"config key 'train.target_spatial_norm' is 1 with manifold_mode 'sample' for {where}: "
                          f"the sample-mode Gram compares mean-pooled tokens, and alpha = 1 makes every pooled target "
                          f"zero; use alpha < 1, manifold_mode 'token', or manifold_coeff 0")
    return {**settings, "align_schedule": schedule}


def check_shard_rows(shard_rows: int, batch_size: int) -> None:
    """Batches must not span two shards, so that every row is encoded in the same batch whatever the shard size."""
    if shard_rows < 1 or shard_rows % batch_size:
        raise ValueError(f"cache.shard_rows ({shard_rows}) must be a positive multiple of cache.batch_size "
                         f"({batch_size}): batches must not span two shards")
