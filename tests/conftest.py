"""Shared constants, helpers and fixtures: the smoke tier's generated inputs and caches (built once per test
session), the trainer the training and export tests build, and the run outputs the evaluation and report tests
read."""
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr
from PIL import Image

from urepa import generated
from urepa.caches import build_clip_cache, build_dino_cache, build_vae_cache
from urepa.config import load_yaml, train_settings
from urepa.curves import cfg_sweep, fid_curve
from urepa.rowstore import CachedRows, valid_rows
from urepa.sd15 import load_noise_scheduler, load_unet
from urepa.subset import build_subset, list_classes
from urepa.vae import LatentNormalisation, vae_record

REPO = Path(__file__).resolve().parents[1]
SCHEMA = REPO / "workflow" / "schemas" / "config.schema.yaml"
CONFIG = load_yaml(REPO / "config" / "config.yaml")  # read only: tests that change a config load their own
SMOKE_IMAGE_SIZE = 128          # VAE input: 128 px -> 4 x 16 x 16 latents
DINO_SIZE = 56                  # the 128 px square at 56 px / patch 14 -> a 4 x 4 token grid
CACHE_BATCH = 4
TRAIN_BATCH = 4                 # the training tests' batch (the smoke tier's own is 8)
SEED = 0
CPU = torch.device("cpu")
VIEW = {"image_size": SMOKE_IMAGE_SIZE, "dino_size": DINO_SIZE}  # the view the shared caches were built with
STAND_IN = "stand-in (random conv net, seed 0; NOT Inception)"


@torch.no_grad()
def unet_prediction(unet, inputs: tuple) -> torch.Tensor:
    """A U-Net's output for (noisy latents, timesteps, text conditions)."""
    sample, timesteps, hidden = inputs
    return unet(sample, timesteps, encoder_hidden_states=hidden).sample


def as_float(values) -> np.ndarray:
    return np.asarray(values, dtype=np.float32)


def write_png(path, colour) -> str:
    """A 40 x 36 image of one colour at `path`; returns the path as text."""
    Image.new("RGB", (40, 36), colour).save(path)
    return str(path)


def write_images(folder: Path, sizes: list[tuple[int, int]], seed: int = 0) -> list[Path]:
    """Random RGB PNGs of the given (height, width), numbered in order."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, (h, w) in enumerate(sizes):
        path = folder / f"{i:03d}.png"
        Image.fromarray(rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8)).save(path)
        paths.append(path)
    return paths


def write_description(weights_dir: Path, finetune: str, sd15_dir: Path) -> None:
    """The weights.json (urepa.export.DESCRIPTION) of a weights folder written by hand, as training exports it
    (trained on the latents of `sd15_dir`'s VAE)."""
    (weights_dir / "weights.json").write_text(json.dumps({
        "finetune": finetune, "prediction": "epsilon", "align_layers": ["mid"], "align_coeff": 0.8,
        "vae": vae_record("sd15", Path(sd15_dir) / "vae")}))


# -- the smoke tier's inputs and caches ---------------------------------------------------------------------
@pytest.fixture(scope="session")
def smoke_inputs(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("smoke_inputs")
    return {
        "imagenet": generated.make_imagenet_tree(root / "imagenet", classes=3, train_images=10,
                                                 val_images=4, seed=0),
        "sd15": generated.make_sd15(root / "sd15", SMOKE_IMAGE_SIZE, seed=0),
        "dinov2": generated.make_dinov2(root / "dinov2", seed=0),
        # a second VAE, as the smoke tier generates for a `vaes:` entry: other weights, its own scaling factor
        "e2e_vae": generated.make_vae("e2e", root / "e2e_vae", SMOKE_IMAGE_SIZE, full_size=False, seed=0),
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
        "vae": build_vae_cache(csv, root / "vae_latents.zarr", smoke_inputs["sd15"] / "vae", SMOKE_IMAGE_SIZE,
                               CACHE_BATCH, 0, CPU),
        "dino": build_dino_cache(csv, root / "dino_tokens.zarr", smoke_inputs["dinov2"], SMOKE_IMAGE_SIZE, DINO_SIZE,
                                 CACHE_BATCH, 0, CPU),
        "clip": build_clip_cache(classes_csv, root / "clip_embeddings.zarr", smoke_inputs["sd15"], CPU, batch_size=2),
    }


@pytest.fixture
def built(smoke_caches) -> dict:
    return smoke_caches


@pytest.fixture(scope="session")
def inception_dir(tmp_path_factory):
    """The rehearsal tier's random Inception torchscript, at the real shapes."""
    return generated.make_model("inception", tmp_path_factory.mktemp("inception"), image_size=512, full_size=True)


# -- training -----------------------------------------------------------------------------------------------
@pytest.fixture(scope="session")
def data(smoke_inputs, smoke_caches) -> dict:
    """What the training tests build trainers and runs from: the cache paths (as train_run takes them), the
    subset table, the model folders, and the opened caches."""
    vae = zarr.open_group(str(smoke_caches["vae"]), mode="r")
    dino = zarr.open_group(str(smoke_caches["dino"]), mode="r")
    clip = zarr.open_group(str(smoke_caches["clip"]), mode="r")
    sd15_vae = smoke_inputs["sd15"] / "vae"
    return {"caches": {name: smoke_caches[name] for name in ("csv", "vae", "dino", "clip")},
            "table": smoke_caches["table"], "sd15": smoke_inputs["sd15"], "dinov2": smoke_inputs["dinov2"],
            "vae": vae, "dino": dino, "clip": clip["embeddings"][:], "null_index": clip.attrs["null_index"],
            "rows": valid_rows(vae, dino), "vae_dir": sd15_vae, "vae_weights": vae_record("sd15", sd15_vae),
            "normalisation": LatentNormalisation.from_config(json.loads((sd15_vae / "config.json").read_text()))}


def settings_for(ablation: str = "urepa", steps: int | None = None, **overrides) -> dict:
    """The smoke tier's resolved settings for an ablation at the training tests' batch of 4; `steps` sets
    max_steps, checkpoint_every and eval_interval alike; `overrides` last."""
    settings = train_settings(CONFIG, "smoke", ablation)
    settings.update(batch_size=TRAIN_BATCH)
    if steps is not None:
        settings.update(max_steps=steps, checkpoint_every=steps, eval_interval=steps)
    settings.update(overrides)
    return settings


def make_trainer(data, settings: dict, run_dir: Path, vae_path=None, noise_scheduler=None, num_workers: int = 0,
                 time_phases: bool = False, report_to: str = "none", seed: int = SEED, normalisation=None):
    """A Trainer built the way train_run builds it, on the shared caches (or another VAE cache at `vae_path`), with
    SD-1.5's latent normalisation (or `normalisation`)."""
    from urepa.train import Trainer

    caches = data["caches"]
    if vae_path is None:
        vae_path, vae, rows = caches["vae"], data["vae"], data["rows"]
    else:
        vae = zarr.open_group(str(vae_path), mode="r")
        rows = valid_rows(vae, data["dino"])
    return Trainer(load_unet(data["sd15"]), noise_scheduler or load_noise_scheduler(data["sd15"]),
                   CachedRows(vae_path, caches["dino"], data["table"]["class_id"].to_numpy()), rows,
                   data["clip"], data["null_index"], data["dino"].attrs["dim"], data["dino"].attrs["grid"],
                   normalisation or data["normalisation"], data["vae_weights"], settings, run_dir, seed, CPU,
                   num_workers, time_phases=time_phases, report_to=report_to)


def batch_of(trainer, data, first: int = 0) -> dict:
    """TRAIN_BATCH valid rows of the shared caches, read as the trainer reads them."""
    return trainer.dataset[data["rows"][first:first + TRAIN_BATCH]]


def run_training(data, settings, out: Path, caches: dict | None = None, seed: int = SEED) -> tuple[Path, Path]:
    """train_run into out/train_state/<identity>/ and out/model/; returns (the run's state folder, model folder)."""
    from urepa.train import train_run

    model_dir = out / "model"
    run_dir = train_run({k: str(v) for k, v in (caches or data["caches"]).items()}, str(data["sd15"]),
                        str(data["dinov2"]), str(data["vae_dir"]), settings, out / "train_state", model_dir, seed, CPU,
                        0, "test", **VIEW)
    return run_dir, model_dir


@pytest.fixture(scope="session")
def smoke_run(data, tmp_path_factory) -> dict:
    """One run on the smoke tier's own settings (batch 8, 120 steps: minutes), shared by the tests of its
    training and of its analysis."""
    settings = train_settings(CONFIG, "smoke", "urepa")
    run_dir, model_dir = run_training(data, settings, tmp_path_factory.mktemp("smoke_run"))
    return {"settings": settings, "run_dir": run_dir, "model_dir": model_dir}


# -- sampling -----------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def pipeline(smoke_inputs, tmp_path_factory):
    """The tiny pipeline with a 'partially fine-tuned' U-Net (perturbed mid block) loaded as a run's weights."""
    from urepa.export import load_finetuned_pipeline

    # What a `v` run exports beside its weights: the training schedule with its parameterisation.
    weights = write_partial_weights(tmp_path_factory.mktemp("weights"), smoke_inputs["sd15"], "v")
    return load_finetuned_pipeline(smoke_inputs["sd15"], weights, torch.device("cpu"))


def write_partial_weights(weights: Path, sd15_dir: Path, prediction: str) -> Path:
    """A 'partially fine-tuned' export in `weights`: the smoke U-Net with its mid block perturbed, the training
    schedule with `prediction`, and a description recording SD-1.5's VAE."""
    from urepa.export import trained_scheduler

    unet = load_unet(sd15_dir)
    with torch.no_grad():
        for p in unet.mid_block.parameters():
            p.add_(0.01)
    unet.save_pretrained(weights / "unet")
    trained_scheduler(load_noise_scheduler(sd15_dir), prediction).save_pretrained(weights / "scheduler")
    write_description(weights, "partial", sd15_dir)
    return weights


# -- evaluation and report ----------------------------------------------------------------------------------
def make_runs(tmp_path, seeds):
    """Run outputs of urepa and baseline at each seed: FID 10 + i (1 + seed) + seed / 2 (i = 0 urepa, 1 baseline)."""
    runs, curves, sweeps, metrics = {}, {}, {}, {}
    for i, ablation in enumerate(["urepa", "baseline"]):
        for seed in seeds:
            d = tmp_path / ablation / f"seed-{seed}"
            d.mkdir(parents=True)
            m = {"fid": 10.0 + i * (1 + seed) + seed / 2, "sfid": 20.0, "kid_mean": 0.01, "kid_std": 0.001, "inception_score_mean": 3.0,
                 "inception_score_std": 0.1, "precision": 0.5, "recall": 0.4, "num_generated": 24, "num_reference": 32,
                 "feature_network": STAND_IN, "checkpoint_step": 120, "weights": "EMA",
                 "sampling": {"sampler": "dpmpp", "steps": 25, "cfg_scale": 7.5, "guidance_low": 0.0, "guidance_high": 0.7}}
            (d / "metrics.json").write_text(json.dumps(m))
            metrics.setdefault(ablation, {})[seed] = m
            points = []
            for step in (40, 80):
                point = {**m, "fid": m["fid"] + 100 / step, "checkpoint_step": step, "num_generated": 12}
                (d / f"point-{step}.json").write_text(json.dumps(point))
                points.append(d / f"point-{step}.json")
            curves.setdefault(ablation, {})[seed] = fid_curve(points)
            # CFG sweep written in the order Snakemake lists the scales; FID lowest at 3.0 for urepa, 2.0 for baseline.
            sweep_files = []
            for scale, fid in ((7.5, 30.0), (1.5, 14.0), (3.0, 9.0 + 2 * i), (2.0, 10.0)):
                point = {**m, "fid": fid, "precision": 0.1 * scale, "num_generated": 12,
                         "sampling": {**m["sampling"], "cfg_scale": scale}}
                (d / f"cfg-{scale:g}.json").write_text(json.dumps(point))
                sweep_files.append(d / f"cfg-{scale:g}.json")
            sweeps.setdefault(ablation, {})[seed] = cfg_sweep(sweep_files)
            entry = {"timestep": 500, "cknna": 0.3 - i / 10, "cknna_chance": 0.01, "cca": 0.5, "cca_components": 2,
                     "cca_pca_dims": 2, "cca_fit_images": 4, "cca_scored_images": 4, "cca_chance": -0.02}
            if ablation == "urepa":
                entry.update(head_token_cosine=0.6, head_token_cosine_chance=0.4, head_cknna=0.7, head_cknna_chance=0.03)
            (d / "alignment.json").write_text(json.dumps({"layer": "mid", "images": 8, "has_head": ablation == "urepa",
                                                          "timesteps": [entry]}))
            runs.setdefault(ablation, {})[seed] = {
                "metrics": str(d / "metrics.json"), "alignment": str(d / "alignment.json"),
                "loss_curve": write_png(d / "loss.png", "red"), "tsne": write_png(d / "tsne.png", "green"),
                "grid": write_png(d / "grid.png", "blue")}
    return runs, curves, sweeps, metrics


@pytest.fixture
def run_files(tmp_path):
    return make_runs(tmp_path, seeds=(0,))
