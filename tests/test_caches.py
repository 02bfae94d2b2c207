"""Stage 2's encoders (urepa.caches): the VAE, DINOv2 and CLIP caches' shapes, row alignment with the CSV and
their metadata. (How rows are stored, sharded, resumed, sealed and read: tests/test_rowstore.py.)

The shared caches (conftest's `smoke_caches`) are built once per session from the smoke inputs at small sizes: VAE at 128 px
(latents 4x16x16), DINOv2 at resize 64 / crop 56 (a 4x4 token grid), CLIP for the tree's classes.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
import zarr
from PIL import Image

from conftest import CPU, DINO_SIZE, SMOKE_IMAGE_SIZE, as_float
from urepa import sd15
from urepa.caches import build_clip_cache
from urepa.digests import file_digest, weights_fingerprint
from urepa.dinov2 import load_dinov2
from urepa.images import dinov2_transform, dinov2_view, vae_transform
from urepa.rowstore import open_cache
from urepa.subset import choose_classes, list_classes


@pytest.fixture(scope="module")
def vae_model(smoke_inputs):
    return sd15.load_vae(smoke_inputs["sd15"], CPU)


@pytest.fixture(scope="module")
def dino_model(smoke_inputs):
    return load_dinov2(smoke_inputs["dinov2"], CPU)


# -- shapes ----------------------------------------------------------------------------------------


def test_vae_cache_shapes(built):
    group = open_cache(built["vae"])
    n = len(built["table"])
    for name in ("mean", "std"):
        assert group[name].shape == (n, 4, SMOKE_IMAGE_SIZE // 8, SMOKE_IMAGE_SIZE // 8)
        assert group[name].dtype == np.float16
        assert np.isfinite(as_float(group[name][:])).all()
    assert (as_float(group["std"][:]) > 0).all()
    assert group["valid"][:].all()
    assert not built["vae"].with_name(built["vae"].name + ".partial").exists()


def test_dino_cache_shapes_and_unit_norm_tokens(built, dino_model):
    group = open_cache(built["dino"])
    tokens = group["tokens"]
    grid = DINO_SIZE // 14
    assert tokens.shape == (len(built["table"]), grid * grid, dino_model.dim)
    assert tokens.dtype == np.float16
    norms = np.linalg.norm(as_float(tokens[:]), axis=-1)
    np.testing.assert_allclose(norms, 1.0, atol=2e-3)


def test_clip_cache_rows_are_class_prompts_then_the_empty_prompt(built, smoke_inputs):
    group = open_cache(built["clip"])
    classes = built["classes"]
    embeddings = group["embeddings"]
    assert embeddings.shape == (len(classes) + 1, 77, 32)
    assert embeddings.dtype == np.float16
    prompts = group.attrs["prompts"]
    assert prompts[-1] == "" and group.attrs["null_index"] == len(classes)
    assert prompts[:-1] == [f"a photo of a {name}" for name in classes["name"]]
    assert prompts[0] == "a photo of a tench"  # n01440764's name in urepa/data/imagenet_classes.tsv
    tokenizer, text_encoder = sd15.load_text_encoder(smoke_inputs["sd15"], CPU)
    for index in (0, len(classes)):  # a class prompt and the null prompt, encoded alone
        ids = tokenizer([prompts[index]], padding="max_length", truncation=True, max_length=77,
                        return_tensors="pt").input_ids
        with torch.no_grad():
            expected = text_encoder(ids)[0][0].half().numpy()
        np.testing.assert_allclose(as_float(embeddings[index]), as_float(expected), rtol=1e-2, atol=2e-3)


def test_clip_cache_of_chosen_classes_has_one_row_per_class_and_the_null_prompt(smoke_inputs, tmp_path):
    classes_csv = tmp_path / "classes.csv"
    choose_classes(list_classes(smoke_inputs["imagenet"]), 2, seed=0).to_csv(classes_csv, index=False)
    cache = zarr.open_group(str(build_clip_cache(classes_csv, tmp_path / "clip.zarr", smoke_inputs["sd15"],
                                                 torch.device("cpu"))), mode="r")
    assert cache["embeddings"].shape[:2] == (3, 77)
    assert cache.attrs["null_index"] == 2 and cache.attrs["prompts"][-1] == ""


# -- row i of every cache is CSV row i ---------------------------------------------------------------


def check_rows_match(cached: np.ndarray, encode, paths: list[str], rows: list[int]) -> None:
    """Each hand-encoded row matches its own cached row, and is nearer to it than to any other row."""
    flat = as_float(cached).reshape(len(cached), -1)
    for row in rows:
        expected = as_float(encode(paths[row])).reshape(-1)
        np.testing.assert_allclose(flat[row], expected, rtol=1e-2, atol=2e-3, err_msg=f"row {row}")
        distances = np.abs(flat - expected).max(axis=1)
        assert int(np.argmin(distances)) == row, f"CSV row {row}'s image is cached in row {np.argmin(distances)}"


def test_vae_rows_align_with_csv(built, vae_model):
    paths = built["table"]["img_path"].tolist()
    transform = vae_transform(SMOKE_IMAGE_SIZE)

    @torch.no_grad()
    def encode(path):
        with Image.open(path) as image:
            posterior = vae_model.encode(transform(image.convert("RGB"))[None]).latent_dist
        return posterior.mean[0].half().numpy()

    check_rows_match(open_cache(built["vae"])["mean"][:], encode, paths, [0, 5, 13, 22, len(paths) - 1])


def test_dino_rows_align_with_csv(built, dino_model):
    paths = built["table"]["img_path"].tolist()
    transform = dinov2_transform(SMOKE_IMAGE_SIZE, DINO_SIZE)

    def encode(path):
        with Image.open(path) as image:
            return dino_model(transform(image)[None])[0].half().numpy()

    check_rows_match(open_cache(built["dino"])["tokens"][:], encode, paths, [0, 7, 14, 21, len(paths) - 1])


# -- metadata ----------------------------------------------------------------------------------------


def test_metadata_attributes(built, smoke_inputs, dino_model):
    digest = file_digest(built["csv"])
    vae = dict(open_cache(built["vae"]).attrs)
    assert vae["encoder"] == "vae:sd15"
    assert vae["encoder_fingerprint"] == weights_fingerprint(smoke_inputs["sd15"] / "vae")
    assert vae["vae"] == {"name": "sd15", "path": str(smoke_inputs["sd15"] / "vae"),
                          "fingerprint": vae["encoder_fingerprint"]}
    assert vae["normalisation"] == {"scaling_factor": 0.18215, "shift_factor": None, "latents_mean": None,
                                    "latents_std": None}
    assert (vae["dim"], vae["grid"], vae["patch_size"], vae["image_size"]) == (4, 16, 8, SMOKE_IMAGE_SIZE)
    assert vae["csv_sha256"] == digest and vae["num_rows"] == len(built["table"])
    dino = dict(open_cache(built["dino"]).attrs)
    assert dino["encoder"] == dino_model.name
    assert dino["encoder_fingerprint"] == weights_fingerprint(smoke_inputs["dinov2"])
    assert (dino["dim"], dino["grid"], dino["patch_size"], dino["image_size"]) == (dino_model.dim, 4, 14, DINO_SIZE)
    assert dino["view"] == dinov2_view(SMOKE_IMAGE_SIZE, DINO_SIZE) and dino["num_tokens"] == 16
    assert dino["csv_sha256"] == digest and dino["num_rows"] == len(built["table"])
    for attrs in (vae, dino):
        assert attrs["complete"] is True and attrs["errors"] == [] and attrs["num_invalid"] == 0
    clip = dict(open_cache(built["clip"]).attrs)
    assert clip["encoder_fingerprint"] == weights_fingerprint(smoke_inputs["sd15"] / "text_encoder")
    assert clip["dim"] == 32 and clip["classes_sha256"] == file_digest(built["classes_csv"])
