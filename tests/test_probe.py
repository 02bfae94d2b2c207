"""The linear probe (urepa.probe): known answers of the classifier (separable features score 1, shuffled labels
chance), the probe set, the per-image noise, and the stage on the smoke tier's caches: the pretrained U-Net with no
fine-tuned weights (against a hand computation), a run's weights, and DINOv2's ceiling."""
from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch
import zarr

from conftest import CPU, DINO_SIZE, SEED, SMOKE_IMAGE_SIZE, write_partial_weights
from urepa import probe
from urepa.probe import (
    fit_and_score,
    image_noise,
    noise_seed,
    probe_dinov2,
    probe_rows,
    probe_unet,
)
from urepa.sd15 import load_noise_scheduler, load_unet
from urepa.subset import build_subset

SETTINGS = {"timestep": 250, "train_images_per_class": 6, "val_images_per_class": None, "C": 1.0, "max_iter": 1000}


def clustered(classes: int, per_class: int, dim: int, spread: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Features around one random centre per class (the same centres for every seed), and their labels."""
    centres = np.random.default_rng(0).standard_normal((classes, dim))
    labels = np.repeat(np.arange(classes), per_class)
    return centres[labels] + spread * np.random.default_rng(seed).standard_normal((len(labels), dim)), labels


def test_separable_features_score_one_and_report_chance():
    train_x, train_y = clustered(4, 20, 32, 0.1, seed=1)
    val_x, val_y = clustered(4, 10, 32, 0.1, seed=2)
    result = fit_and_score(train_x, train_y, val_x, val_y, C=1.0, max_iter=1000)
    assert result["top1"] == 1.0 and result["train_top1"] == 1.0
    assert result["chance"] == 0.25 and result["classes"] == 4
    assert (result["train_images"], result["val_images"], result["features"]) == (80, 40, 32)
    assert result["converged"] and result["iterations"] <= 1000


def test_shuffled_labels_score_chance():
    # The same separable features with both sets' labels shuffled: the labels carry nothing of the features, so
    # whatever the probe predicts is right for 1/8 of the balanced validation labels, up to sampling.
    train_x, train_y = clustered(8, 40, 32, 0.1, seed=1)
    val_x, val_y = clustered(8, 100, 32, 0.1, seed=2)
    rng = np.random.default_rng(3)
    result = fit_and_score(train_x, rng.permutation(train_y), val_x, rng.permutation(val_y), C=1.0, max_iter=1000)
    # 800 validation images: the accuracy of guessing has a standard deviation of 0.012 around 1/8
    assert result["chance"] == 1 / 8
    assert abs(result["top1"] - 1 / 8) < 0.05
    assert fit_and_score(train_x, train_y, val_x, val_y, C=1.0, max_iter=1000)["top1"] == 1.0


def test_a_fit_that_stops_early_says_so(caplog):
    train_x, train_y = clustered(4, 20, 32, 2.0, seed=1)
    result = fit_and_score(train_x, train_y, train_x, train_y, C=1.0, max_iter=1)
    assert not result["converged"] and result["iterations"] == 1 and "did not converge" in caplog.text


def test_the_probe_set_is_class_balanced_seeded_and_drawn_from_valid_rows():
    table = pd.DataFrame({"id": [f"img{i}" for i in range(30)], "class_id": np.repeat([0, 1, 2], 10)})
    valid = np.setdiff1d(np.arange(30), [0, 1, 12])
    rows = probe_rows(table, valid, 4, seed=0)
    assert np.array_equal(rows, probe_rows(table, valid, 4, seed=0))
    assert np.all(np.diff(rows) > 0) and set(rows) <= set(valid)
    assert table.loc[rows, "class_id"].value_counts().to_dict() == {0: 4, 1: 4, 2: 4}
    assert not np.array_equal(rows, probe_rows(table, valid, 4, seed=1))
    # a class's draw depends on its own rows and the seed only
    fewer = probe_rows(table, np.setdiff1d(valid, [25]), 4, seed=0)
    assert np.array_equal(rows[table.loc[rows, "class_id"] < 2], fewer[table.loc[fewer, "class_id"] < 2])
    assert len(probe_rows(table, valid, 8, seed=0)) == 24  # class 0 has exactly 8 usable rows
    with pytest.raises(ValueError, match="train_images_per_class is 9 but class 0 has 8 usable rows"):
        probe_rows(table, valid, 9, seed=0)
    with pytest.raises(ValueError, match=r"classes \[2\] have no usable row"):
        probe_rows(table, np.arange(20), 2, seed=0)


def test_each_images_noise_is_its_own_whatever_the_batch():
    noise = image_noise((4, 2, 2), ["a", "b", "c"], seed=0)
    assert torch.equal(image_noise((4, 2, 2), ["c", "a"], seed=0), noise[[2, 0]])
    assert torch.equal(noise[1], torch.randn((4, 2, 2), generator=torch.Generator().manual_seed(noise_seed(0, "b"))))
    assert not torch.equal(noise[0], image_noise((4, 2, 2), ["a"], seed=1)[0])
    assert not torch.equal(noise[0], noise[1])


# -- the stage on the smoke tier's caches -------------------------------------------------------------------


@pytest.fixture(scope="module")
def probe_inputs(smoke_inputs, smoke_caches, tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("probe")
    val_csv = root / "val_subset.csv"
    build_subset(smoke_inputs["imagenet"], images_per_class=4, seed=0, split="val").to_csv(val_csv, index=False)
    clip = zarr.open_group(str(smoke_caches["clip"]), mode="r")
    return {"csv": smoke_caches["csv"], "val_csv": val_csv, "sd15": smoke_inputs["sd15"],
            "dinov2": smoke_inputs["dinov2"], "latents": smoke_caches["vae"], "dino": smoke_caches["dino"],
            "null": clip["embeddings"][clip.attrs["null_index"]], "root": root}


def run_probe(inputs: dict, weights_dir, monkeypatch, layer: str | None = "mid") -> tuple[dict, dict]:
    """probe_unet on the smoke caches; returns its result and the features it fitted on (train_x, val_x)."""
    seen = {}

    def recording(train_x, train_y, val_x, val_y, C, max_iter):
        seen.update(train_x=train_x, val_x=val_x, train_y=np.asarray(train_y), val_y=np.asarray(val_y))
        return fit_and_score(train_x, train_y, val_x, val_y, C, max_iter)

    monkeypatch.setattr(probe, "fit_and_score", recording)
    result = probe_unet(inputs["csv"], inputs["val_csv"], inputs["sd15"], weights_dir, inputs["sd15"] / "vae",
                        inputs["latents"], inputs["dino"], inputs["null"], SMOKE_IMAGE_SIZE, SETTINGS, SEED, CPU,
                        batch_size=5, layer=layer)
    return result, seen


def test_the_pretrained_probe_loads_no_fine_tuned_weights(probe_inputs, monkeypatch):
    import urepa.export

    def refused(*args, **kwargs):
        raise AssertionError("the pretrained probe loaded a weights folder")

    monkeypatch.setattr(urepa.export, "load_finetuned_pipeline", refused)
    result, seen = run_probe(probe_inputs, None, monkeypatch)
    assert result["model"] == "pretrained" and result["weights"] is None and result["layer"] == "mid"
    assert (result["classes"], result["train_images"], result["val_images"]) == (3, 18, 12)
    assert result["chance"] == pytest.approx(1 / 3) and 0 <= result["top1"] <= 1

    # By hand: SD-1.5's U-Net from its folder, the cached posterior means of the probe rows scaled by the VAE's
    # scaling factor, noised as q(z_t | z_0) with each image's seeded noise, the mid block's output averaged.
    table = pd.read_csv(probe_inputs["csv"])
    latents = zarr.open_group(str(probe_inputs["latents"]), mode="r")
    rows = probe_rows(table, np.flatnonzero(latents["valid"][:]), SETTINGS["train_images_per_class"], SEED)
    z0 = torch.from_numpy(latents["mean"][:][rows]).float() * latents.attrs["normalisation"]["scaling_factor"]
    alpha_bar = load_noise_scheduler(probe_inputs["sd15"]).alphas_cumprod[250]
    zt = alpha_bar.sqrt() * z0 + (1 - alpha_bar).sqrt() * image_noise(tuple(z0.shape[1:]), table["id"][rows], SEED)
    unet, captured = load_unet(probe_inputs["sd15"]), []
    unet.mid_block.register_forward_hook(lambda module, inputs, output: captured.append(output))
    with torch.no_grad():
        unet(zt, torch.full((len(rows),), 250), encoder_hidden_states=torch.from_numpy(probe_inputs["null"])
             .float().expand(len(rows), -1, -1))
    np.testing.assert_allclose(seen["train_x"], captured[0].mean(dim=(2, 3)).numpy(), rtol=1e-4, atol=1e-5)
    assert np.array_equal(seen["train_y"], table["class_id"][rows])


def test_a_runs_probe_reads_its_weights_at_the_layer_it_is_analysed_at(probe_inputs, monkeypatch):
    pretrained, before = run_probe(probe_inputs, None, monkeypatch)
    weights = write_partial_weights(probe_inputs["root"] / "weights", probe_inputs["sd15"], "epsilon")
    tuned, after = run_probe(probe_inputs, weights, monkeypatch, layer=None)
    assert tuned["model"] == "weights" and tuned["weights"] == str(weights) and tuned["layer"] == "mid"
    # the perturbed mid block moves the features; the images, labels and their order are the same
    assert np.array_equal(before["train_y"], after["train_y"]) and np.array_equal(before["val_y"], after["val_y"])
    assert np.abs(before["train_x"] - after["train_x"]).max() > 1e-3
    json.dumps(tuned)  # what the script writes


def test_dinov2_ceiling_pools_the_cached_tokens_and_probes_the_same_images(probe_inputs, monkeypatch):
    seen = {}

    def recording(train_x, train_y, val_x, val_y, C, max_iter):
        seen.update(train_x=train_x, train_y=np.asarray(train_y))
        return fit_and_score(train_x, train_y, val_x, val_y, C, max_iter)

    monkeypatch.setattr(probe, "fit_and_score", recording)
    result = probe_dinov2(probe_inputs["csv"], probe_inputs["val_csv"], probe_inputs["dinov2"], probe_inputs["latents"],
                          probe_inputs["dino"], SMOKE_IMAGE_SIZE, DINO_SIZE, SETTINGS, SEED, CPU, batch_size=5)
    assert result["model"] == "dinov2" and result["timestep"] is None
    assert (result["classes"], result["train_images"], result["val_images"]) == (3, 18, 12)
    table = pd.read_csv(probe_inputs["csv"])
    tokens = zarr.open_group(str(probe_inputs["dino"]), mode="r")
    rows = probe_rows(table, np.flatnonzero(tokens["valid"][:]), SETTINGS["train_images_per_class"], SEED)
    np.testing.assert_allclose(seen["train_x"], tokens["tokens"][:][rows].astype(np.float32).mean(axis=1), rtol=1e-6)
    assert np.array_equal(seen["train_y"], table["class_id"][rows])


@pytest.mark.slow  # trains the smoke tier's 120-step run (conftest's smoke_run): minutes
def test_the_probe_of_a_trained_run(smoke_run, probe_inputs, monkeypatch):
    result, seen = run_probe(probe_inputs, smoke_run["model_dir"] / "ema", monkeypatch, layer=None)
    assert result["model"] == "weights" and result["layer"] == "mid" and result["val_images"] == 12
    assert np.isfinite(seen["train_x"]).all() and seen["train_x"].shape == (18, 64)
