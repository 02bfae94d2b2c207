# Stage 5: reference statistics (once per tier), metrics of each sample set, FID-vs-step points,
# and the alignment analyses of each run.


def inception_dir(wildcards):
    """clean-fid's Inception folder (from config, or the rehearsal tier's generated one); none for the
    stand-in network."""
    return [inception_path(wildcards)] if tier_of(wildcards)["feature_network"] == "inception" else []


rule reference_stats:
    input:
        csv=lambda w: f"{data_dir(w.tier)}/val_subset.csv",
        inception=inception_dir,
    output:
        "results/{tier}/reference_stats.npz",
    params:
        image_size=lambda w: tier_of(w)["image_size"],
        network=lambda w: tier_of(w)["feature_network"],
    threads: 2
    log:
        "results/{tier}/logs/reference_stats.log",
    benchmark:
        "results/{tier}/benchmarks/reference_stats.tsv"
    script:
        "../scripts/reference_stats.py"


rule metrics:
    input:
        samples="results/{tier}/{ablation}/samples",
        reference="results/{tier}/reference_stats.npz",
        model="results/{tier}/{ablation}/model",
        inception=inception_dir,
    output:
        "results/{tier}/{ablation}/metrics.json",
    params:
        network=lambda w: tier_of(w)["feature_network"],
        checkpoint_step=None,  # the final step, read from the model folder
    threads: 2
    log:
        "results/{tier}/{ablation}/logs/metrics.log",
    benchmark:
        "results/{tier}/{ablation}/benchmarks/metrics.tsv"
    script:
        "../scripts/metrics.py"


rule point_metrics:
    input:
        samples="results/{tier}/{ablation}/{point}/samples",
        reference="results/{tier}/reference_stats.npz",
        model="results/{tier}/{ablation}/model",
        inception=inception_dir,
    output:
        "results/{tier}/{ablation}/{point}/metrics.json",
    params:
        network=lambda w: tier_of(w)["feature_network"],
        checkpoint_step=lambda w: point_of(w)[1] if point_of(w)[0] == "step" else None,
    threads: 2
    log:
        "results/{tier}/{ablation}/{point}/metrics.log",
    script:
        "../scripts/metrics.py"


rule fid_curve:
    input:
        lambda w: [f"results/{w.tier}/{w.ablation}/curve/step-{s:07d}/metrics.json"
                   for s in curve_steps(w.tier, w.ablation)],
    output:
        "results/{tier}/{ablation}/fid_curve.json",
    log:
        "results/{tier}/{ablation}/logs/fid_curve.log",
    script:
        "../scripts/fid_curve.py"


rule cfg_sweep:
    input:
        lambda w: [f"results/{w.tier}/{w.ablation}/cfg_sweep/cfg-{scale_name(s)}/metrics.json"
                   for s in cfg_scales(w.tier)],
    output:
        "results/{tier}/{ablation}/cfg_sweep.json",
    log:
        "results/{tier}/{ablation}/logs/cfg_sweep.log",
    script:
        "../scripts/cfg_sweep.py"


rule alignment:
    input:
        model="results/{tier}/{ablation}/model",
        csv=lambda w: f"{data_dir(w.tier)}/val_subset.csv",
        clip=lambda w: cache_paths(w.tier)["clip"],
        sd15=sd15_dir,
        dinov2=dinov2_path,
    output:
        scores="results/{tier}/{ablation}/alignment.json",
        tsne=report("results/{tier}/{ablation}/tsne.png", caption="../report/tsne.rst", category="Alignment",
                    subcategory="{ablation}"),
    params:
        images=lambda w: tier_of(w)["analysis_images"],
        timesteps=config["evaluate"]["analysis_timesteps"],
        settings=lambda w: urepa_config.train_settings(config, w.tier, w.ablation),
        dino_size=lambda w: tier_of(w)["dino_size"],
        image_size=lambda w: tier_of(w)["image_size"],
    threads: 2
    log:
        "results/{tier}/{ablation}/logs/alignment.log",
    script:
        "../scripts/alignment.py"
