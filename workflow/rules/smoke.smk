# The embedded smoke tier's inputs: a generated ILSVRC tree and tiny random models in the real layouts.


rule smoke_imagenet:
    output:
        directory("results/{tier}/inputs/imagenet"),
    params:
        tier=tier_of,
    log:
        "results/{tier}/logs/smoke_imagenet.log",
    script:
        "../scripts/smoke_imagenet.py"


rule smoke_models:
    output:
        sd15=directory("results/{tier}/inputs/sd15"),
        dinov2=directory("results/{tier}/inputs/dinov2"),
    params:
        tier=tier_of,
    log:
        "results/{tier}/logs/smoke_models.log",
    script:
        "../scripts/smoke_models.py"
