# Stage 3: U-REPA fine-tuning of one (tier, ablation) run. Checkpoints live in train_state/<identity>/, which
# is not an output, so a killed or failed run started again resumes instead of starting over, and a run whose
# settings, data and code were seen before finds its state again.


rule train_unet:
    input:
        csv=lambda w: cache_paths(w.tier)["csv"],
        vae=lambda w: latent_cache(w.tier, run_vae(w)),
        vae_model=lambda w: vae_model(w, run_vae(w)),
        dino=lambda w: cache_paths(w.tier)["dino"],
        clip=lambda w: cache_paths(w.tier)["clip"],
        sd15=sd15_dir,
        dinov2=dinov2_path,
    output:
        model=report(directory("results/{tier}/{ablation}/seed-{seed}/model"), patterns=["loss_curve.png"],
                     caption="../report/loss_curve.rst", category="Training losses", subcategory="{ablation}, seed {seed}"),
    params:
        # without processes / grad_accum / the speed options: they change no result, so changing them reruns nothing
        settings=lambda w: urepa_config.without_launch(urepa_config.train_settings(config, w.tier, w.ablation)),
        states_dir="results/{tier}/{ablation}/seed-{seed}/train_state",
        vae_subfolder=lambda w: vae_subfolder(run_vae(w)),
        image_size=lambda w: tier_of(w)["image_size"],
        dino_size=lambda w: tier_of(w)["dino_size"],
    threads: job_threads("train_unet")
    resources:
        **job_resources("train_unet"),
        # how the run is executed and tracked: neither changes its weights (nor its identity), so no rerun
        processes=lambda w: urepa_config.train_settings(config, w.tier, w.ablation)["processes"],
        grad_accum=lambda w: urepa_config.train_settings(config, w.tier, w.ablation)["grad_accum"],
        speed=lambda w: urepa_config.speed_resource(urepa_config.train_settings(config, w.tier, w.ablation)),
        report_to=config["report_to"],
    wildcard_constraints:
        # the joint rows' U-Nets come from tune_vae (rule joint_unet)
        ablation="|".join(re.escape(a) for a in config["ablations"] if a not in urepa_config.joint_ablations(config)),
    log:
        "results/{tier}/{ablation}/seed-{seed}/logs/train_unet.log",
    benchmark:
        "results/{tier}/{ablation}/seed-{seed}/benchmarks/train_unet.tsv"
    conda:
        "../../environment.yml"
    script:
        "../scripts/train_unet.py"


rule pretrained_model:
    # SD-1.5 as it is, as a weights folder (urepa.export.save_pretrained_description: no U-Net weights, SD-1.5's
    # scheduler and VAE), so the sampling and scoring rules run on it unchanged with ablation `pretrained`: the
    # final table's reference row and every curve's step 0. train_unet never matches it (its ablation constraint).
    input:
        sd15=sd15_dir,
        vae_model=lambda w: vae_model(w, urepa_config.SD15_VAE),
    output:
        directory(f"results/{{tier}}/{urepa_config.PRETRAINED}/seed-{{seed}}/model"),
    params:
        vae=urepa_config.SD15_VAE,
        vae_subfolder=vae_subfolder(urepa_config.SD15_VAE),
    log:
        f"results/{{tier}}/{urepa_config.PRETRAINED}/seed-{{seed}}/logs/pretrained_model.log",
    conda:
        "../../environment.yml"
    script:
        "../scripts/pretrained_model.py"
