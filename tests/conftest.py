"""Shared fixtures: the smoke tier's generated inputs, built once per test session."""
from pathlib import Path

import pytest
import torch

from urepa import generated
from urepa.caches import build_clip_cache, build_dino_cache, build_vae_cache
from urepa.subset import build_subset, list_classes

REPO = Path(__file__).resolve().parents[1]
SCHEMA = REPO / "workflow" / "schemas" / "config.schema.yaml"
SMOKE_IMAGE_SIZE = 128          # VAE input: 128 px -> 4 x 16 x 16 latents
DINO_SIZE = 56                  # the 128 px square at 56 px / patch 14 -> a 4 x 4 token grid
CACHE_BATCH = 4
CPU = torch.device("cpu")


@torch.no_grad()
def unet_prediction(unet, inputs: tuple) -> torch.Tensor:
    """A U-Net's output for (noisy latents, timesteps, text conditions)."""
    sample, timesteps, hidden = inputs
    return unet(sample, timesteps, encoder_hidden_states=hidden).sample


@pytest.fixture(scope="session")
def smoke_inputs(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("smoke_inputs")
    return {
        "imagenet": generated.make_imagenet_tree(root / "imagenet", classes=3, train_images=10,
                                                 val_images=4, seed=0),
        "sd15": generated.make_sd15(root / "sd15", SMOKE_IMAGE_SIZE, seed=0),
        "dinov2": generated.make_dinov2(root / "dinov2", seed=0),
    }


@pytest.fixture(scope="session")
def smoke_caches(smoke_inputs, tmp_path_factory) -> dict:
    """The subset (10 images per class) and its three caches at the smoke tier's sizes, built once and
    only read by the tests that share them."""
    root = tmp_path_factory.mktemp("caches")
    table = build_subset(smoke_inputs["imagenet"], images_per_class=10, seed=0)
    csv, classes_csv = root / "subset.csv", root / "classes.csv"
    table.to_csv(csv, index=False)
    classes = list_classes(smoke_inputs["imagenet"])
    classes.to_csv(classes_csv, index=False)
    return {
        "root": root, "csv": csv, "table": table, "classes_csv": classes_csv, "classes": classes,
        "vae": build_vae_cache(csv, root / "vae_latents.zarr", smoke_inputs["sd15"], SMOKE_IMAGE_SIZE, CACHE_BATCH,
                               0, CPU),
        "dino": build_dino_cache(csv, root / "dino_tokens.zarr", smoke_inputs["dinov2"], SMOKE_IMAGE_SIZE, DINO_SIZE,
                                 CACHE_BATCH, 0, CPU),
        "clip": build_clip_cache(classes_csv, root / "clip_embeddings.zarr", smoke_inputs["sd15"], CPU, batch_size=2),
    }
