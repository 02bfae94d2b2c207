# Stage 4: class-balanced samples from the EMA weights.
#
# Two kinds of sample set per run: the final set (`sample_preset`, `sample_images_per_class`, kept), and
# evaluation points (`curve_preset`, `curve_images_per_class`, deleted once scored): one per EMA snapshot
# for FID vs step (`curve/step-<step>`), one per guidance scale of the final weights for the CFG sweep
# (`cfg_sweep/cfg-<scale>`; at the curve preset's own scale the sweep reads the last curve point). Each set is drawn by `sample_shards` jobs over index ranges (whole batches of one
# batch grid, each image from its own seeded noise: the bytes do not depend on the shard count), written into
# <dir>.partial and renamed when complete, so a killed job resumes batch by batch; `sample` and `sample_point`
# gather the shards.


rule sample_shard:
    input:
        model="results/{tier}/{ablation}/seed-{seed}/model",
        clip=lambda w: cache_paths(w.tier)["clip"],
        classes=lambda w: cache_paths(w.tier)["classes"],
        sd15=sd15_dir,
        vae_model=lambda w: vae_model(w, decode_vae(w)),
    output:
        temp(directory("results/{tier}/{ablation}/seed-{seed}/shards/{set}/{shard}-of-{shards}")),
    params:
        weights=set_weights,
        vae=decode_vae,
        vae_subfolder=lambda w: vae_subfolder(decode_vae(w)),
        allow_other_vae=config["sample"]["decode_vae"] is not None,
        images_per_class=lambda w: set_images_per_class(w, w.set),
        sampling=set_sampling,
        batch_size=config["sample"]["batch_size"],  # batched denoising: the images' last bits depend on it
    threads: job_threads(set_resources)
    resources:
        **job_resources(set_resources),
    log:
        "results/{tier}/{ablation}/seed-{seed}/logs/sample/{set}/{shard}-of-{shards}.log",
    benchmark:
        "results/{tier}/{ablation}/seed-{seed}/benchmarks/sample/{set}/{shard}-of-{shards}.tsv"
    conda:
        "../../environment.yml"
    script:
        "../scripts/sample.py"


rule sample:
    input:
        shards=lambda w: shard_dirs(w, "final"),
        classes=lambda w: cache_paths(w.tier)["classes"],
    output:
        samples=directory("results/{tier}/{ablation}/seed-{seed}/samples"),
        grid=report("results/{tier}/{ablation}/seed-{seed}/sample_grid.png", caption="../report/sample_grid.rst",
                    category="Samples", subcategory="{ablation}, seed {seed}"),
    params:
        images_per_class=lambda w: set_images_per_class(w, "final"),
    log:
        "results/{tier}/{ablation}/seed-{seed}/logs/sample.log",
    conda:
        "../../environment.yml"
    script:
        "../scripts/gather_samples.py"


rule sample_point:
    input:
        shards=lambda w: shard_dirs(w, w.point),
        classes=lambda w: cache_paths(w.tier)["classes"],
    output:
        samples=temp(directory("results/{tier}/{ablation}/seed-{seed}/{point}/samples")),
        grid="results/{tier}/{ablation}/seed-{seed}/{point}/sample_grid.png",
    params:
        images_per_class=lambda w: set_images_per_class(w, w.point),
    log:
        "results/{tier}/{ablation}/seed-{seed}/{point}/sample.log",
    conda:
        "../../environment.yml"
    script:
        "../scripts/gather_samples.py"
