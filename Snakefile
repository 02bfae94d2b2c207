# urepa: U-REPA fine-tuning of the SD-1.5 U-Net, from ImageNet subset to report.
#   snakemake --cores 1                                  # the embedded smoke tier, end to end
#   snakemake --cores 1 --config tier=tierB ablation=token_only
from snakemake.utils import min_version

min_version("8.0")


configfile: "config/config.yaml"


include: "workflow/rules/common.smk"
include: "workflow/rules/generated.smk"
include: "workflow/rules/subset.smk"
include: "workflow/rules/caches.smk"
include: "workflow/rules/train.smk"
include: "workflow/rules/vae_tune.smk"
include: "workflow/rules/sample.smk"
include: "workflow/rules/evaluate.smk"
include: "workflow/rules/report.smk"


report: "workflow/report/workflow.rst"


# Rules that read and write a few small files: they run on the submitting host, not as cluster jobs.
localrules:
    all,
    subset,
    val_subset,
    fid_curve,
    cfg_sweep,
    fid_summary,
    report,
    summary,
    sample,
    sample_point,
    generated_imagenet,
    generated_model,
    joint_unet,
    verify_caches,
    pretrained_model,
    comparison_grid,


rule all:
    input:
        default_targets(),
    default_target: True
