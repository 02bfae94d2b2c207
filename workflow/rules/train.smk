# Stage 3: U-REPA fine-tuning of one (tier, ablation) run. Checkpoints live in train_state/<identity>/, which
# is not an output, so a killed or failed run started again resumes instead of starting over, and a run whose
# settings, data and code were seen before finds its state again.


rule train_unet:
    input:
        csv=lambda w: cache_paths(w.tier)["csv"],
        vae=lambda w: cache_paths(w.tier)["vae"],
        dino=lambda w: cache_paths(w.tier)["dino"],
        clip=lambda w: cache_paths(w.tier)["clip"],
        sd15=sd15_dir,
        dinov2=dinov2_path,
    output:
        model=directory("results/{tier}/{ablation}/model"),
    params:
        # without processes / grad_accum: they change no result, so changing them reruns nothing
        settings=lambda w: urepa_config.without_launch(urepa_config.train_settings(config, w.tier, w.ablation)),
        states_dir="results/{tier}/{ablation}/train_state",
        image_size=lambda w: tier_of(w)["image_size"],
        dino_size=lambda w: tier_of(w)["dino_size"],
    threads: 2
    log:
        "results/{tier}/{ablation}/logs/train_unet.log",
    benchmark:
        "results/{tier}/{ablation}/benchmarks/train_unet.tsv"
    script:
        "../scripts/train_unet.py"
