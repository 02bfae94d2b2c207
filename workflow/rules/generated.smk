# The embedded smoke tier's inputs: a generated ILSVRC tree and tiny random models in the real layouts.


rule smoke_imagenet:
    output:
        directory("results/{tier}/inputs/imagenet"),
    params:
        classes=lambda w: tier_of(w)["smoke_classes"],
        train_images=lambda w: tier_of(w)["smoke_train_images"],
        val_images=lambda w: tier_of(w)["smoke_val_images"],
    log:
        "results/{tier}/logs/smoke_imagenet.log",
    script:
        "../scripts/smoke_imagenet.py"


rule smoke_models:
    output:
        sd15=directory("results/{tier}/inputs/sd15"),
        dinov2=directory("results/{tier}/inputs/dinov2"),
    params:
        image_size=lambda w: tier_of(w)["image_size"],
    log:
        "results/{tier}/logs/smoke_models.log",
    script:
        "../scripts/smoke_models.py"
