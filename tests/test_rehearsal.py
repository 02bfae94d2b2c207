"""What the rehearsal tier's run left in results/rehearsal/: caches and sample sets at the real shapes.

Run after `snakemake --cores 2 results/rehearsal/fid.json results/rehearsal/vae/sd15/recon.json --config
tier=rehearsal` (CI does); skipped while
results/rehearsal/ does not exist, and failing on any missing output or wrong shape once it does.
"""
import json

import numpy as np
import pandas as pd
import pytest
import zarr
from PIL import Image

from conftest import REPO
from urepa import config as urepa_config
from urepa.feature_networks import INCEPTION_NAME

RESULTS = REPO / "results" / "rehearsal"
pytestmark = [pytest.mark.rehearsal,
              pytest.mark.skipif(not RESULTS.is_dir(), reason="no rehearsal run in results/rehearsal/")]


@pytest.fixture(scope="module")
def tier() -> dict:
    return urepa_config.load_yaml(REPO / "config" / "config.yaml")["tiers"]["rehearsal"]


@pytest.fixture(scope="module")
def rows(tier) -> int:
    table = pd.read_csv(RESULTS / "subset.csv")
    assert len(table) == tier["classes"] * tier["images_per_class"]
    return len(table)


def test_vae_latents_are_4_x_64_x_64(rows):
    cache = zarr.open_group(str(RESULTS / "cache" / "sd15" / "vae_latents.zarr"), mode="r")
    for name in ("mean", "std"):
        assert cache[name].shape == (rows, 4, 64, 64), name
        assert np.isfinite(cache[name][:]).all(), name


def test_dino_tokens_are_16_x_16_of_1024(rows):
    cache = zarr.open_group(str(RESULTS / "cache" / "dino_tokens.zarr"), mode="r")
    assert cache["tokens"].shape == (rows, 256, 1024)
    assert cache["valid"][:].all()


def test_clip_embeddings_are_77_x_768_per_chosen_class_and_the_null_prompt(tier):
    cache = zarr.open_group(str(RESULTS / "cache" / "clip_embeddings.zarr"), mode="r")
    classes = pd.read_csv(RESULTS / "classes.csv")
    assert len(classes) == tier["classes"] < tier["generated"]["classes"]
    assert cache["embeddings"].shape == (tier["classes"] + 1, 77, 768)


def test_samples_are_512_px_and_scored_by_the_inception_path(tier):
    summary = json.loads((RESULTS / "fid.json").read_text())
    for ablation, run, metrics in [(a, run, m) for a, entry in summary.items() for run, m in entry["runs"].items()]:
        samples = sorted((RESULTS / ablation / run / "samples").glob("*.png"))  # run: "seed-<seed>"
        assert len(samples) == tier["classes"] * tier["sample_images_per_class"] == metrics["num_generated"]
        with Image.open(samples[0]) as image:
            assert image.size == (512, 512)
        assert metrics["feature_network"] == INCEPTION_NAME
        assert np.isfinite(metrics["fid"]) and np.isfinite(metrics["sfid"]), ablation


def test_recon_eval_ran_at_512_px_with_the_real_vae_architecture(tier):
    from urepa.sd15 import SD15_VAE_CONFIG

    vae_config = json.loads((RESULTS / "inputs" / "sd15" / "vae" / "config.json").read_text())
    assert {key: vae_config[key] for key in SD15_VAE_CONFIG} == SD15_VAE_CONFIG
    result = json.loads((RESULTS / "vae" / "sd15" / "recon.json").read_text())
    assert result["vae"] == "sd15" and result["image_size"] == 512 and result["skipped"] == []
    assert result["images"] == tier["classes"] * tier["recon_images_per_class"]
    assert result["feature_network"] == INCEPTION_NAME and "stand-in" in result["lpips_network"]
    assert all(np.isfinite(result[key]) for key in ("psnr", "ssim", "lpips", "rfid"))
