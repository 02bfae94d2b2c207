# Stage 2: zarr caches: one latent cache per VAE in use (cache/<vae>/), the DINOv2 and CLIP caches shared by all.
# The latent and DINOv2 caches are built by `cache.shards` part jobs over whole zarr shards of one build folder,
# results/<tier>/cache/<name>.zarr.partial (not an output, so Snakemake keeps it and a killed part resumes from
# its unfinished shards); the sealing rule checks every row and renames the finished store into place. Each part's output is a temporary marker that only orders the jobs.


rule cache_vae_part:
    input:
        csv="results/{tier}/subset.csv",
        vae_model=lambda w: vae_model(w, w.vae),
    output:
        temp("results/{tier}/cache/{vae}/vae_latents.parts/{part}-of-{parts}.json"),
    params:
        vae_subfolder=lambda w: vae_subfolder(w.vae),
        image_size=lambda w: tier_of(w)["image_size"],
        batch_size=lambda w: cache_settings(w.tier)["batch_size"],
        shard_rows=lambda w: cache_settings(w.tier)["shard_rows"],
        cache="results/{tier}/cache/{vae}/vae_latents.zarr",
    wildcard_constraints:
        part=r"\d+",
        parts=r"\d+",
    threads: job_threads("cache_vae")
    resources:
        **job_resources("cache_vae"),
    log:
        "results/{tier}/logs/cache_vae_{vae}_part{part}-of-{parts}.log",
    benchmark:
        "results/{tier}/benchmarks/cache_vae_{vae}_part{part}-of-{parts}.tsv"
    conda:
        "../../environment.yml"
    script:
        "../scripts/cache_vae.py"


rule cache_vae:
    input:
        cache_parts("{vae}/vae_latents"),
    output:
        directory("results/{tier}/cache/{vae}/vae_latents.zarr"),
    threads: job_threads("cache_seal")
    resources:
        **job_resources("cache_seal"),
    log:
        "results/{tier}/logs/cache_vae_{vae}.log",
    benchmark:
        "results/{tier}/benchmarks/cache_vae_{vae}.tsv"
    conda:
        "../../environment.yml"
    script:
        "../scripts/cache_seal.py"


rule cache_dino_part:
    input:
        csv="results/{tier}/subset.csv",
        dinov2=dinov2_path,
    output:
        temp("results/{tier}/cache/dino_tokens.parts/{part}-of-{parts}.json"),
    params:
        image_size=lambda w: tier_of(w)["image_size"],
        dino_size=lambda w: tier_of(w)["dino_size"],
        batch_size=lambda w: cache_settings(w.tier)["batch_size"],
        shard_rows=lambda w: cache_settings(w.tier)["shard_rows"],
        cache="results/{tier}/cache/dino_tokens.zarr",
    wildcard_constraints:
        part=r"\d+",
        parts=r"\d+",
    threads: job_threads("cache_dino")
    resources:
        **job_resources("cache_dino"),
    log:
        "results/{tier}/logs/cache_dino_part{part}-of-{parts}.log",
    benchmark:
        "results/{tier}/benchmarks/cache_dino_part{part}-of-{parts}.tsv"
    conda:
        "../../environment.yml"
    script:
        "../scripts/cache_dino.py"


rule cache_dino:
    input:
        cache_parts("dino_tokens"),
    output:
        directory("results/{tier}/cache/dino_tokens.zarr"),
    threads: job_threads("cache_seal")
    resources:
        **job_resources("cache_seal"),
    log:
        "results/{tier}/logs/cache_dino.log",
    benchmark:
        "results/{tier}/benchmarks/cache_dino.tsv"
    conda:
        "../../environment.yml"
    script:
        "../scripts/cache_seal.py"


rule cache_clip:
    input:
        classes="results/{tier}/classes.csv",
        sd15=sd15_dir,
    output:
        directory("results/{tier}/cache/clip_embeddings.zarr"),
    threads: job_threads("cache_clip")
    resources:
        **job_resources("cache_clip"),
    log:
        "results/{tier}/logs/cache_clip.log",
    conda:
        "../../environment.yml"
    script:
        "../scripts/cache_clip.py"


rule verify_caches:
    # `snakemake verify_caches [--config tier=...]`: every cache of the tier read whole against its checksums (each
    # row's CRC-32C and the seal's SHA-256 per array); ~half an hour for tierB's DINOv2 tokens. Training checks every
    # row it reads anyway; this finds damage before a run, and names it. Its marker is temporary: it runs each time.
    input:
        f"results/{TIER}/cache/verified.json",


rule verify_tier_caches:
    input:
        vae=lambda w: [latent_cache(w.tier, vae) for vae in urepa_config.tier_vaes(config, w.tier)],
        dino=lambda w: cache_paths(w.tier)["dino"],
        clip=lambda w: cache_paths(w.tier)["clip"],
    output:
        temp("results/{tier}/cache/verified.json"),
    threads: job_threads("cache_seal")
    resources:
        **job_resources("cache_seal"),
    log:
        "results/{tier}/logs/verify_caches.log",
    conda:
        "../../environment.yml"
    script:
        "../scripts/verify_caches.py"
