# Stage 3b (REPA-E, part 2): tune SD-1.5's VAE end to end through the alignment loss, the U-Net's LoRA and heads
# trained alongside. The output folder is a VAE like a `vaes:` entry: `cache_vae` re-encodes the subset with its
# vae/, and runs that name it train on those latents. State (checkpoints) lives in train_state/<identity>/, not an
# output, so a killed job resumes.


rule tune_vae:
    input:
        csv=lambda w: cache_paths(w.tier)["csv"],
        vae=lambda w: latent_cache(w.tier, urepa_config.SD15_VAE),  # reference moments and anchor targets
        dino=lambda w: cache_paths(w.tier)["dino"],
        clip=lambda w: cache_paths(w.tier)["clip"],
        sd15=sd15_dir,
        dinov2=dinov2_path,
        vgg16=lambda w: [] if tier_of(w)["source"] in urepa_config.GENERATED_SOURCES else [config["vgg16"]],
        disc_ckpt=lambda w: [path] if (path := urepa_config.tune_settings(config, w.tier, w.vae)["disc_ckpt"]) else [],
    output:
        directory("results/{tier}/vae/{vae}/tuned"),
    params:
        tune=lambda w: urepa_config.tune_settings(config, w.tier, w.vae),
        # without processes: it changes no result, so changing it reruns nothing (it comes back as a resource)
        unet_settings=lambda w: urepa_config.without_launch(urepa_config.tune_unet_settings(config, w.tier, w.vae)),
        states_dir="results/{tier}/vae/{vae}/train_state",
        image_size=lambda w: tier_of(w)["image_size"],
        dino_size=lambda w: tier_of(w)["dino_size"],
        lpips_seed=config["data_seed"],
    wildcard_constraints:
        vae="|".join(map(re.escape, urepa_config.tuned_vaes(config))),
    threads: job_threads("tune_vae")
    resources:
        **job_resources("tune_vae"),
        processes=lambda w: urepa_config.tune_unet_settings(config, w.tier, w.vae)["processes"],
        # train's speed options (the tier's `train`), as train_unet's: they change no result, so no rerun
        speed=lambda w: urepa_config.speed_resource(urepa_config.tune_unet_settings(config, w.tier, w.vae)),
    log:
        "results/{tier}/logs/tune_vae_{vae}.log",
    benchmark:
        "results/{tier}/benchmarks/tune_vae_{vae}.tsv"
    conda:
        "../../environment.yml"
    script:
        "../scripts/tune_vae.py"


rule joint_unet:
    # A joint row (vae_tune.joint_ablations): the U-Net trained inside a tuning run, as a run folder.
    input:
        lambda w: tuned_vae_dir(w.tier, urepa_config.joint_ablations(config)[w.ablation]),
    output:
        directory("results/{tier}/{ablation}/seed-{seed}/model"),
    wildcard_constraints:
        ablation="|".join(map(re.escape, urepa_config.joint_ablations(config))),
    log:
        "results/{tier}/{ablation}/seed-{seed}/logs/joint_unet.log",
    conda:
        "../../environment.yml"
    script:
        "../scripts/joint_unet.py"
