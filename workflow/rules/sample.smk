# Stage 4: class-balanced samples from the EMA weights. Samples are written into <dir>.partial and
# renamed when complete, so a killed job resumes image by image.
#
# Two kinds of sample set per run: the final set (`sample_preset`, `sample_images_per_class`, kept), and
# evaluation points (`curve_preset`, `curve_images_per_class`, deleted once scored): one per EMA snapshot
# for FID vs step (`curve/step-<step>`), one per guidance scale of the final weights for the CFG sweep
# (`cfg_sweep/cfg-<scale>`).


def preset(key):
    """Input function: the sampler settings of the tier's `sample_preset` or `curve_preset`."""
    return lambda wildcards: config["sample"]["presets"][tier_of(wildcards)[key]]


final_sampling = preset("sample_preset")


def curve_steps(tier, ablation):
    """Training steps with an EMA snapshot: every eval_interval, and the last step."""
    settings = urepa_config.train_settings(config, tier, ablation)
    steps = set(range(settings["eval_interval"], settings["max_steps"] + 1, settings["eval_interval"]))
    return sorted(steps | {settings["max_steps"]})


def cfg_scales(tier):
    """The guidance scales of the tier's CFG sweep."""
    return urepa_config.tier_settings(config, tier).get("cfg_sweep", config["sample"]["cfg_sweep"])


def scale_name(scale):
    return f"{float(scale):g}"


def point_of(wildcards):
    """(kind, value) of an evaluation point: ("step", 40) or ("cfg", 4.5)."""
    kind, _, value = wildcards.point.rpartition("-")
    return ("step", int(value)) if kind == "curve/step" else ("cfg", float(value))


def point_sampling(wildcards):
    sampling = dict(preset("curve_preset")(wildcards))
    kind, value = point_of(wildcards)
    if kind == "cfg":
        sampling["cfg_scale"] = value
    return sampling


def point_weights(wildcards):
    kind, value = point_of(wildcards)
    model = f"results/{wildcards.tier}/{wildcards.ablation}/model"
    return f"{model}/snapshots/step-{value:07d}" if kind == "step" else f"{model}/ema"


wildcard_constraints:
    point=r"curve/step-[0-9]+|cfg_sweep/cfg-[0-9]+(\.[0-9]+)?",


rule sample:
    input:
        model="results/{tier}/{ablation}/model",
        clip=lambda w: cache_paths(w.tier)["clip"],
        classes=lambda w: cache_paths(w.tier)["classes"],
        sd15=sd15_dir,
    output:
        samples=directory("results/{tier}/{ablation}/samples"),
        grid=report("results/{tier}/{ablation}/sample_grid.png", caption="../report/sample_grid.rst",
                    category="Samples", subcategory="{ablation}"),
    params:
        weights="results/{tier}/{ablation}/model/ema",
        images_per_class=lambda w: tier_of(w)["sample_images_per_class"],
        sampling=final_sampling,
        settings=lambda w: urepa_config.train_settings(config, w.tier, w.ablation),
    threads: 2
    log:
        "results/{tier}/{ablation}/logs/sample.log",
    benchmark:
        "results/{tier}/{ablation}/benchmarks/sample.tsv"
    script:
        "../scripts/sample.py"


rule sample_point:
    input:
        model="results/{tier}/{ablation}/model",
        clip=lambda w: cache_paths(w.tier)["clip"],
        classes=lambda w: cache_paths(w.tier)["classes"],
        sd15=sd15_dir,
    output:
        samples=temp(directory("results/{tier}/{ablation}/{point}/samples")),
        grid="results/{tier}/{ablation}/{point}/sample_grid.png",
    params:
        weights=point_weights,
        images_per_class=lambda w: tier_of(w)["curve_images_per_class"],
        sampling=point_sampling,
        settings=lambda w: urepa_config.train_settings(config, w.tier, w.ablation),
    threads: 2
    log:
        "results/{tier}/{ablation}/{point}/sample.log",
    script:
        "../scripts/sample.py"
