# Stage 2: zarr caches. Outputs are renamed into place only when complete; an interrupted build
# resumes from results/<tier>/cache/<name>.zarr.partial (not an output, so Snakemake keeps it).


rule cache_vae:
    input:
        csv="results/{tier}/subset.csv",
        sd15=sd15_dir,
    output:
        directory("results/{tier}/cache/vae_latents.zarr"),
    params:
        image_size=lambda w: tier_of(w)["image_size"],
    threads: job_threads("cache_vae")
    resources:
        **job_resources("cache_vae"),
    log:
        "results/{tier}/logs/cache_vae.log",
    benchmark:
        "results/{tier}/benchmarks/cache_vae.tsv"
    conda:
        "../../environment.yml"
    script:
        "../scripts/cache_vae.py"


rule cache_dino:
    input:
        csv="results/{tier}/subset.csv",
        dinov2=dinov2_path,
    output:
        directory("results/{tier}/cache/dino_tokens.zarr"),
    params:
        image_size=lambda w: tier_of(w)["image_size"],
        dino_size=lambda w: tier_of(w)["dino_size"],
    threads: job_threads("cache_dino")
    resources:
        **job_resources("cache_dino"),
    log:
        "results/{tier}/logs/cache_dino.log",
    benchmark:
        "results/{tier}/benchmarks/cache_dino.tsv"
    conda:
        "../../environment.yml"
    script:
        "../scripts/cache_dino.py"


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
