# Stage 2: zarr caches. The VAE and DINOv2 caches are built by `cache.shards` part jobs over whole zarr
# shards of one build folder, results/<tier>/cache/<name>.zarr.partial (not an output, so Snakemake keeps
# it and a killed part resumes from its unfinished shards); the sealing rule checks every row and renames
# the finished store into place. Each part's output is a temporary marker that only orders the jobs.

from urepa.caches import check_shard_rows


def cache_settings(tier):
    """config's `cache`, with the tier's own `cache` keys over it."""
    return {**config["cache"], **urepa_config.tier_settings(config, tier).get("cache", {})}


_cache = cache_settings(urepa_config.data_tier(config, TIER))
check_shard_rows(_cache["shard_rows"], _cache["batch_size"])  # before any job


def cache_parts(name):
    """Input function of a sealing rule: the markers of every part job of cache `name`."""

    def inputs(wildcards):
        parts = cache_settings(wildcards.tier)["shards"]
        return [f"results/{wildcards.tier}/cache/{name}.parts/{part}-of-{parts}.json" for part in range(parts)]

    return inputs


rule cache_vae_part:
    input:
        csv="results/{tier}/subset.csv",
        sd15=sd15_dir,
    output:
        temp("results/{tier}/cache/vae_latents.parts/{part}-of-{parts}.json"),
    params:
        image_size=lambda w: tier_of(w)["image_size"],
        batch_size=lambda w: cache_settings(w.tier)["batch_size"],
        shard_rows=lambda w: cache_settings(w.tier)["shard_rows"],
        cache="results/{tier}/cache/vae_latents.zarr",
    wildcard_constraints:
        part=r"\d+",
        parts=r"\d+",
    threads: 2
    log:
        "results/{tier}/logs/cache_vae_part{part}-of-{parts}.log",
    benchmark:
        "results/{tier}/benchmarks/cache_vae_part{part}-of-{parts}.tsv"
    script:
        "../scripts/cache_vae.py"


rule cache_vae:
    input:
        cache_parts("vae_latents"),
    output:
        directory("results/{tier}/cache/vae_latents.zarr"),
    log:
        "results/{tier}/logs/cache_vae.log",
    benchmark:
        "results/{tier}/benchmarks/cache_vae.tsv"
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
    threads: 2
    log:
        "results/{tier}/logs/cache_dino_part{part}-of-{parts}.log",
    benchmark:
        "results/{tier}/benchmarks/cache_dino_part{part}-of-{parts}.tsv"
    script:
        "../scripts/cache_dino.py"


rule cache_dino:
    input:
        cache_parts("dino_tokens"),
    output:
        directory("results/{tier}/cache/dino_tokens.zarr"),
    log:
        "results/{tier}/logs/cache_dino.log",
    benchmark:
        "results/{tier}/benchmarks/cache_dino.tsv"
    script:
        "../scripts/cache_seal.py"


rule cache_clip:
    input:
        classes="results/{tier}/classes.csv",
        sd15=sd15_dir,
    output:
        directory("results/{tier}/cache/clip_embeddings.zarr"),
    log:
        "results/{tier}/logs/cache_clip.log",
    script:
        "../scripts/cache_clip.py"
