# Stage 1: uniform per-class samples of the ILSVRC train and validation sets.


rule subset:
    input:
        imagenet=imagenet_dir,
    output:
        csv="results/{tier}/subset.csv",
        classes="results/{tier}/classes.csv",
    params:
        data_seed=config["data_seed"],
        split="train",
        images_per_class=lambda w: tier_of(w)["images_per_class"],
        classes=lambda w: tier_of(w).get("classes"),
    log:
        "results/{tier}/logs/subset.log",
    conda:
        "../../environment.yml"
    script:
        "../scripts/subset.py"


rule val_subset:
    input:
        imagenet=imagenet_dir,
    output:
        csv="results/{tier}/val_subset.csv",
    params:
        data_seed=config["data_seed"],
        split="val",
        images_per_class=lambda w: tier_of(w)["val_images_per_class"],
        classes=lambda w: tier_of(w).get("classes"),
    log:
        "results/{tier}/logs/val_subset.log",
    conda:
        "../../environment.yml"
    script:
        "../scripts/subset.py"
