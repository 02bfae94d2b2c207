# Stage 5: reference statistics (once per tier), metrics of each sample set, FID-vs-step points,
# the alignment analyses of each run, and the reconstruction metrics of each VAE in use.


rule reference_stats:
    input:
        csv=lambda w: f"{data_dir(w.tier)}/val_subset.csv",
        inception=inception_dir,
    output:
        "results/{tier}/reference_stats.npz",
    params:
        image_size=lambda w: tier_of(w)["image_size"],
        network=lambda w: tier_of(w)["feature_network"],
        batch_size=config["evaluate"]["batch_size"],
    threads: job_threads("reference_stats")
    resources:
        **job_resources("reference_stats"),
    log:
        "results/{tier}/logs/reference_stats.log",
    benchmark:
        "results/{tier}/benchmarks/reference_stats.tsv"
    conda:
        "../../environment.yml"
    script:
        "../scripts/reference_stats.py"


rule metrics:
    input:
        samples="results/{tier}/{ablation}/seed-{seed}/samples",
        reference="results/{tier}/reference_stats.npz",
        model="results/{tier}/{ablation}/seed-{seed}/model",
        inception=inception_dir,
    output:
        "results/{tier}/{ablation}/seed-{seed}/metrics.json",
    params:
        network=lambda w: tier_of(w)["feature_network"],
        checkpoint_step=None,  # the final step, read from the model folder
        batch_size=config["evaluate"]["batch_size"],
    threads: job_threads("metrics")
    resources:
        **job_resources("metrics"),
    log:
        "results/{tier}/{ablation}/seed-{seed}/logs/metrics.log",
    benchmark:
        "results/{tier}/{ablation}/seed-{seed}/benchmarks/metrics.tsv"
    conda:
        "../../environment.yml"
    script:
        "../scripts/metrics.py"


rule point_metrics:
    input:
        samples="results/{tier}/{ablation}/seed-{seed}/{point}/samples",
        reference="results/{tier}/reference_stats.npz",
        model="results/{tier}/{ablation}/seed-{seed}/model",
        inception=inception_dir,
    output:
        "results/{tier}/{ablation}/seed-{seed}/{point}/metrics.json",
    params:
        network=lambda w: tier_of(w)["feature_network"],
        checkpoint_step=lambda w: sample_set(w.point)[1] if sample_set(w.point)[0] == "step" else None,
        batch_size=config["evaluate"]["batch_size"],
    threads: job_threads("point_metrics")
    resources:
        **job_resources("point_metrics"),
    log:
        "results/{tier}/{ablation}/seed-{seed}/{point}/metrics.log",
    conda:
        "../../environment.yml"
    script:
        "../scripts/metrics.py"


rule fid_curve:
    input:
        # step 0: SD-1.5 as it is, the same point (chosen seed's noise) for every run of the tier
        lambda w: [pretrained_outputs(w.tier)["curve_point"],
                   *(f"results/{w.tier}/{w.ablation}/seed-{w.seed}/curve/step-{s:07d}/metrics.json"
                     for s in curve_steps(w.tier, w.ablation))],
    output:
        "results/{tier}/{ablation}/seed-{seed}/fid_curve.json",
    log:
        "results/{tier}/{ablation}/seed-{seed}/logs/fid_curve.log",
    conda:
        "../../environment.yml"
    script:
        "../scripts/fid_curve.py"


rule cfg_sweep:
    input:
        lambda w: [cfg_point_metrics(w, s) for s in cfg_scales(w.tier)],
    output:
        "results/{tier}/{ablation}/seed-{seed}/cfg_sweep.json",
    log:
        "results/{tier}/{ablation}/seed-{seed}/logs/cfg_sweep.log",
    conda:
        "../../environment.yml"
    script:
        "../scripts/cfg_sweep.py"


rule alignment:
    input:
        model="results/{tier}/{ablation}/seed-{seed}/model",
        csv=lambda w: f"{data_dir(w.tier)}/val_subset.csv",
        clip=lambda w: cache_paths(w.tier)["clip"],
        classes=lambda w: cache_paths(w.tier)["classes"],
        sd15=sd15_dir,
        dinov2=dinov2_path,
        vae_model=lambda w: vae_model(w, run_vae(w)),
    output:
        scores="results/{tier}/{ablation}/seed-{seed}/alignment.json",
        tsne=report("results/{tier}/{ablation}/seed-{seed}/tsne.png", caption="../report/tsne.rst", category="Alignment",
                    subcategory="{ablation}, seed {seed}"),
    params:
        images=lambda w: tier_of(w)["analysis_images"],
        data_seed=config["data_seed"],
        timesteps=config["evaluate"]["analysis_timesteps"],
        dino_size=lambda w: tier_of(w)["dino_size"],
        image_size=lambda w: tier_of(w)["image_size"],
        batch_size=config["evaluate"]["batch_size"],
        vae_subfolder=lambda w: vae_subfolder(run_vae(w)),
    threads: job_threads("alignment")
    resources:
        **job_resources("alignment"),
    log:
        "results/{tier}/{ablation}/seed-{seed}/logs/alignment.log",
    conda:
        "../../environment.yml"
    script:
        "../scripts/alignment.py"


rule recon_eval:
    # A VAE's reconstruction of the tier's validation subset (the caches' square crop): PSNR, SSIM, LPIPS, rFID.
    input:
        csv=lambda w: f"{data_dir(w.tier)}/val_subset.csv",
        vae_model=lambda w: vae_model(w, w.vae),
        inception=inception_dir,
        vgg16=lambda w: [] if tier_of(w)["source"] in urepa_config.GENERATED_SOURCES else [config["vgg16"]],
    output:
        "results/{tier}/vae/{vae}/recon.json",
    params:
        vae_subfolder=lambda w: vae_subfolder(w.vae),
        image_size=lambda w: tier_of(w)["image_size"],
        network=lambda w: tier_of(w)["feature_network"],
        batch_size=config["evaluate"]["batch_size"],
        lpips_seed=config["data_seed"],
        images_per_class=lambda w: tier_of(w).get("recon_images_per_class"),
    threads: job_threads("recon_eval")
    resources:
        **job_resources("recon_eval"),
    log:
        "results/{tier}/logs/recon_eval_{vae}.log",
    benchmark:
        "results/{tier}/benchmarks/recon_eval_{vae}.tsv"
    conda:
        "../../environment.yml"
    script:
        "../scripts/recon_eval.py"


# The linear probe (urepa/probe.py): each run's EMA weights, and once per tier the references: SD-1.5's U-Net as it is
# (no fine-tuned weights) and DINOv2's own features (the ceiling).
from urepa.analysis import analysis_layer


rule probe:
    input:
        model="results/{tier}/{ablation}/seed-{seed}/model",
        csv=lambda w: cache_paths(w.tier)["csv"],
        val_csv=lambda w: f"{data_dir(w.tier)}/val_subset.csv",
        latents=lambda w: latent_cache(w.tier, run_vae(w)),
        dino=lambda w: cache_paths(w.tier)["dino"],
        clip=lambda w: cache_paths(w.tier)["clip"],
        sd15=sd15_dir,
        vae_model=lambda w: vae_model(w, run_vae(w)),
    output:
        "results/{tier}/{ablation}/seed-{seed}/probe.json",
    params:
        settings=probe_settings,
        image_size=lambda w: tier_of(w)["image_size"],
        data_seed=config["data_seed"],
        batch_size=config["evaluate"]["batch_size"],
        vae_subfolder=lambda w: vae_subfolder(run_vae(w)),
    threads: job_threads("probe")
    resources:
        **job_resources("probe"),
    log:
        "results/{tier}/{ablation}/seed-{seed}/logs/probe.log",
    benchmark:
        "results/{tier}/{ablation}/seed-{seed}/benchmarks/probe.tsv"
    conda:
        "../../environment.yml"
    script:
        "../scripts/probe.py"


rule probe_references:
    input:
        csv=lambda w: cache_paths(w.tier)["csv"],
        val_csv=lambda w: f"{data_dir(w.tier)}/val_subset.csv",
        latents=lambda w: latent_cache(w.tier, urepa_config.SD15_VAE),
        dino=lambda w: cache_paths(w.tier)["dino"],
        clip=lambda w: cache_paths(w.tier)["clip"],
        sd15=sd15_dir,
        dinov2=dinov2_path,
    output:
        pretrained="results/{tier}/pretrained/probe.json",
        dinov2="results/{tier}/dinov2/probe.json",
    params:
        settings=probe_settings,
        # the layer the chosen ablation is analysed at (`mid` by default), so the rows compare one layer
        layer=lambda w: analysis_layer(urepa_config.train_settings(config, w.tier, config["ablation"])["align_layers"]),
        image_size=lambda w: tier_of(w)["image_size"],
        dino_size=lambda w: tier_of(w)["dino_size"],
        data_seed=config["data_seed"],
        batch_size=config["evaluate"]["batch_size"],
    threads: job_threads("probe")
    resources:
        **job_resources("probe"),
    log:
        "results/{tier}/logs/probe_references.log",
    benchmark:
        "results/{tier}/benchmarks/probe_references.tsv"
    conda:
        "../../environment.yml"
    script:
        "../scripts/probe.py"
