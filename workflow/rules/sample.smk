# Stage 4: class-balanced samples from the EMA weights. Samples are written into <dir>.partial and
# renamed when complete, so a killed job resumes image by image.


def preset(key):
    """Input function: the sampler settings of the tier's `sample_preset` or `curve_preset`."""
    return lambda wildcards: config["sample"]["presets"][tier_of(wildcards)[key]]


final_sampling, curve_sampling = preset("sample_preset"), preset("curve_preset")


def curve_steps(tier, ablation):
    """Training steps with an EMA snapshot: every eval_interval, and the last step."""
    settings = urepa_config.train_settings(config, tier, ablation)
    steps = set(range(settings["eval_interval"], settings["max_steps"] + 1, settings["eval_interval"]))
    return sorted(steps | {settings["max_steps"]})


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


rule sample_snapshot:
    input:
        model="results/{tier}/{ablation}/model",
        clip=lambda w: cache_paths(w.tier)["clip"],
        classes=lambda w: cache_paths(w.tier)["classes"],
        sd15=sd15_dir,
    output:
        samples=temp(directory("results/{tier}/{ablation}/curve/step-{step}/samples")),
        grid="results/{tier}/{ablation}/curve/step-{step}/sample_grid.png",
    params:
        weights="results/{tier}/{ablation}/model/snapshots/step-{step}",
        images_per_class=lambda w: tier_of(w)["curve_images_per_class"],
        sampling=curve_sampling,
        settings=lambda w: urepa_config.train_settings(config, w.tier, w.ablation),
    threads: 2
    log:
        "results/{tier}/{ablation}/logs/sample_snapshot-{step}.log",
    script:
        "../scripts/sample.py"
