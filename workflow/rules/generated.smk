# Inputs of the tiers that generate their own (source smoke or rehearsal), under results/<tier>/inputs/ in
# the real layouts: an ILSVRC image tree, and random models (SD-1.5 pipeline, DINOv2, and for the
# rehearsal tier's FID clean-fid's Inception file), tiny for smoke, the real architectures for rehearsal.


rule generated_imagenet:
    output:
        directory("results/{tier}/inputs/imagenet"),
    params:
        data_seed=config["data_seed"],
        spec=lambda w: tier_of(w)["generated"],
    log:
        "results/{tier}/logs/generated_imagenet.log",
    benchmark:
        "results/{tier}/benchmarks/generated_imagenet.tsv"
    conda:
        "../../environment.yml"
    script:
        "../scripts/generated_imagenet.py"


rule generated_model:
    output:
        directory("results/{tier}/inputs/{model}"),
    wildcard_constraints:
        model="sd15|dinov2|inception",
    params:
        data_seed=config["data_seed"],
        image_size=lambda w: tier_of(w)["image_size"],
        full_size=lambda w: tier_of(w)["source"] == "rehearsal",
    log:
        "results/{tier}/logs/generated_{model}.log",
    benchmark:
        "results/{tier}/benchmarks/generated_{model}.tsv"
    conda:
        "../../environment.yml"
    script:
        "../scripts/generated_model.py"


rule generated_vae:
    output:
        directory("results/{tier}/inputs/vaes/{vae}"),
    params:
        data_seed=config["data_seed"],
        image_size=lambda w: tier_of(w)["image_size"],
        full_size=lambda w: tier_of(w)["source"] == "rehearsal",
    log:
        "results/{tier}/logs/generated_vae_{vae}.log",
    benchmark:
        "results/{tier}/benchmarks/generated_vae_{vae}.tsv"
    conda:
        "../../environment.yml"
    script:
        "../scripts/generated_vae.py"
