# Stage 4: class-balanced samples from the EMA weights. Samples are written into <dir>.partial and
# renamed when complete, so a killed job resumes image by image.
#
# Two kinds of sample set per run: the final set (`sample_preset`, `sample_images_per_class`, kept), and
# evaluation points (`curve_preset`, `curve_images_per_class`, deleted once scored): one per EMA snapshot
# for FID vs step (`curve/step-<step>`), one per guidance scale of the final weights for the CFG sweep
# (`cfg_sweep/cfg-<scale>`).


rule sample:
    input:
        model="results/{tier}/{ablation}/seed-{seed}/model",
        clip=lambda w: cache_paths(w.tier)["clip"],
        classes=lambda w: cache_paths(w.tier)["classes"],
        sd15=sd15_dir,
    output:
        samples=directory("results/{tier}/{ablation}/seed-{seed}/samples"),
        grid=report("results/{tier}/{ablation}/seed-{seed}/sample_grid.png", caption="../report/sample_grid.rst",
                    category="Samples", subcategory="{ablation}, seed {seed}"),
    params:
        weights="results/{tier}/{ablation}/seed-{seed}/model/ema",
        images_per_class=lambda w: tier_of(w)["sample_images_per_class"],
        sampling=final_sampling,
        settings=lambda w: urepa_config.train_settings(config, w.tier, w.ablation),
    threads: job_threads("sample")
    resources:
        **job_resources("sample"),
    log:
        "results/{tier}/{ablation}/seed-{seed}/logs/sample.log",
    benchmark:
        "results/{tier}/{ablation}/seed-{seed}/benchmarks/sample.tsv"
    conda:
        "../../environment.yml"
    script:
        "../scripts/sample.py"


rule sample_point:
    input:
        model="results/{tier}/{ablation}/seed-{seed}/model",
        clip=lambda w: cache_paths(w.tier)["clip"],
        classes=lambda w: cache_paths(w.tier)["classes"],
        sd15=sd15_dir,
    output:
        samples=temp(directory("results/{tier}/{ablation}/seed-{seed}/{point}/samples")),
        grid="results/{tier}/{ablation}/seed-{seed}/{point}/sample_grid.png",
    params:
        weights=point_weights,
        images_per_class=lambda w: tier_of(w)["curve_images_per_class"],
        sampling=point_sampling,
        settings=lambda w: urepa_config.train_settings(config, w.tier, w.ablation),
    threads: job_threads("sample_point")
    resources:
        **job_resources("sample_point"),
    log:
        "results/{tier}/{ablation}/seed-{seed}/{point}/sample.log",
    conda:
        "../../environment.yml"
    script:
        "../scripts/sample.py"
