"""Stage 3: the training loop -- kill-and-resume equals an uninterrupted run, NaN stops with the last
good checkpoint intact, the smoke tier lowers the token loss and moves the U-Net's own features towards
DINOv2's (against a baseline run), diffusers-loadable artifacts, the baseline ablation, cache/encoder
mismatch, and the step sampler.

The subset and the three caches are conftest's `smoke_caches`, at the sizes the smoke tier uses: VAE at
128 px (latents 4x16x16), DINOv2 on the same square at 56 px (a 4x4 token grid), CLIP for the tree's classes. Runs are tiny (batch 4, a few steps) except the one
smoke-tier run that checks the token loss goes down, whose artifacts the artifact and alignment tests reuse.
"""
from __future__ import annotations

import itertools
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import zarr
from PIL import Image
from safetensors.torch import load_file

from conftest import DINO_SIZE, SMOKE_IMAGE_SIZE, unet_prediction
from urepa import generated
from urepa.caches import (
    CachedRows,
    CacheMismatchError,
    valid_rows,
)
from urepa.config import load_yaml, train_settings
from urepa.evaluate import alignment_analysis, analysis_layer
from urepa.models import TRAINABLE_BLOCKS, AlignedUNet, make_trainable
from urepa.sd15 import load_noise_scheduler, load_unet
from urepa.subset import build_subset
from urepa.train import LOG_COLUMNS, StepBatches, Trainer, claim_run_state, run_state_dir, train_run

REPO = Path(__file__).resolve().parents[1]
CONFIG = load_yaml(REPO / "config" / "config.yaml")
CPU = torch.device("cpu")
BATCH = 4
SEED = 0
VIEW = {"image_size": SMOKE_IMAGE_SIZE, "dino_size": DINO_SIZE}  # the view the shared caches were built with


# -- shared inputs ----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def data(smoke_inputs, smoke_caches) -> dict:
    caches = {name: smoke_caches[name] for name in ("csv", "vae", "dino", "clip")}
    return {"caches": caches, "table": smoke_caches["table"], "sd15": smoke_inputs["sd15"],
            "dinov2": smoke_inputs["dinov2"]}


def settings_for(ablation: str = "urepa", **overrides) -> dict:
    """The smoke tier's resolved settings for an ablation, made smaller where a test says so."""
    settings = train_settings(CONFIG, "smoke", ablation)
    settings.update(batch_size=BATCH, **overrides)
    return settings


def run(data, settings, out: Path, caches: dict | None = None, seed: int = SEED) -> tuple[Path, Path]:
    """Train into out/train_state/<identity>/ and out/model/; returns (the run's state folder, model folder)."""
    model_dir = out / "model"
    run_dir = train_run({k: str(v) for k, v in (caches or data["caches"]).items()}, str(data["sd15"]),
                        str(data["dinov2"]), settings, out / "train_state", model_dir, seed, CPU, 0, "test", **VIEW)
    return run_dir, model_dir


def state_of(states_dir: Path) -> Path:
    """The one run state (identity folder) under a train_state/ folder."""
    (state,) = [marker.parent for marker in states_dir.glob("*/run.json")]
    return state


def make_trainer(data, settings, run_dir, vae_path=None, seed: int = SEED) -> Trainer:
    """A Trainer built the way train_run builds it, for tests that look inside one."""
    caches = data["caches"]
    vae_path = vae_path or caches["vae"]
    vae, dino = zarr.open_group(str(vae_path), mode="r"), zarr.open_group(str(caches["dino"]), mode="r")
    clip = zarr.open_group(str(caches["clip"]), mode="r")
    return Trainer(load_unet(data["sd15"]), load_noise_scheduler(data["sd15"]),
                   CachedRows(vae_path, caches["dino"], data["table"]["class_id"].to_numpy()), valid_rows(vae, dino),
                   clip["embeddings"][:], clip.attrs["null_index"], dino.attrs["dim"], dino.attrs["grid"],
                   vae.attrs["scaling_factor"], settings, run_dir, seed, CPU, 0, time_phases=False,
                   report_to="tensorboard")


def rebuild_model(data, settings, state: dict[str, torch.Tensor]) -> AlignedUNet:
    """The trained model (U-Net + LoRA + heads) from a checkpoint's model.safetensors."""
    dino = zarr.open_group(str(data["caches"]["dino"]), mode="r")
    unet = load_unet(data["sd15"])
    make_trainable(unet, settings["finetune"], settings["lora_rank"], settings["lora_targets"])
    model = AlignedUNet(unet, settings["align_layers"], dino.attrs["dim"], dino.attrs["grid"],
                        settings["projector"], settings["projector_hidden"])
    model.load_state_dict(state, strict=True)
    return model.eval()


def copy_cache(source: Path, destination: Path) -> zarr.Group:
    shutil.copytree(source, destination)
    return zarr.open_group(str(destination), mode="r+")


def read_log(run_dir: Path) -> pd.DataFrame:
    return pd.read_csv(run_dir / "train_log.csv")


def load_pickle(path: Path):
    return torch.load(path, weights_only=False)


def checkpoint_state(checkpoint: Path) -> dict:
    """Everything a checkpoint holds, by meaning: model tensors, EMA, optimiser, train state."""
    custom = [load_pickle(p) for p in sorted(checkpoint.glob("custom_checkpoint_*.pkl"))]
    ema = next(c for c in custom if "shadow_params" in c)
    state = next(c for c in custom if "generator" in c)
    return {"model": load_file(checkpoint / "model.safetensors"), "ema": ema, "train": state,
            "optimizer": load_pickle(checkpoint / "optimizer.bin"), "scheduler": load_pickle(checkpoint / "scheduler.bin")}


def assert_tensors_equal(a: dict, b: dict, what: str) -> None:
    assert a.keys() == b.keys(), what
    for key in a:
        assert torch.equal(a[key], b[key]), f"{what}: {key} differs"


# -- 1. kill and resume -----------------------------------------------------------------------------
CHILD = """
import json, sys
import torch
torch.set_num_threads(1)  # the same arithmetic in every process: bit-identical results
from urepa.runtime import setup_logging
from urepa.train import train_run
setup_logging()
a = json.load(open(sys.argv[1]))
train_run(a["caches"], a["sd15"], a["dinov2"], a["settings"], a["run_dir"], a["model_dir"], a["seed"],
          torch.device("cpu"), 0, "resume test", image_size=a["image_size"], dino_size=a["dino_size"])
"""


def _start_child(script: Path, args: dict, name: str, tmp_path: Path) -> tuple[subprocess.Popen, Path]:
    args_file, log_path = tmp_path / f"{name}.json", tmp_path / f"{name}.log"
    args_file.write_text(json.dumps(args))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    with open(log_path, "wb") as log_file:
        process = subprocess.Popen([sys.executable, str(script), str(args_file)], stdout=log_file,
                                   stderr=subprocess.STDOUT, env=env)
    return process, log_path


def test_killed_and_resumed_run_equals_an_uninterrupted_one(data, tmp_path):
    settings = settings_for(max_steps=12, checkpoint_every=4, eval_interval=4)
    script = tmp_path / "child.py"
    script.write_text(CHILD)

    def args(name):
        return {"caches": {k: str(v) for k, v in data["caches"].items()}, "sd15": str(data["sd15"]),
                "dinov2": str(data["dinov2"]), "settings": settings, "seed": SEED, **VIEW,
                "run_dir": str(tmp_path / name / "train_state"), "model_dir": str(tmp_path / name / "model")}

    # The reference run and the run to be killed, side by side (one thread each on the two cores).
    reference, reference_log = _start_child(script, args("uninterrupted"), "uninterrupted", tmp_path)
    victim, victim_log = _start_child(script, args("resumed"), "killed", tmp_path)
    states = tmp_path / "resumed" / "train_state"
    # Kill while checkpoint-8 is being written (resume then starts from checkpoint-4, redoes logged
    # steps 5-8 and overwrites the half-written folder) or, if that window is missed, just after it.
    deadline = time.monotonic() + 300
    try:
        while victim.poll() is None and time.monotonic() < deadline:
            if any(states.glob("*/checkpoints/checkpoint-8.tmp")) or any(states.glob("*/checkpoints/checkpoint-8")):
                break
            time.sleep(0.002)
    finally:
        victim.send_signal(signal.SIGKILL)
        victim.wait()
    killed = victim.returncode == -signal.SIGKILL
    checkpoints = state_of(states) / "checkpoints"
    if killed:
        complete = sorted(p.name for p in checkpoints.glob("checkpoint-*[0-9]"))
        assert complete and complete[-1] in ("checkpoint-4", "checkpoint-8"), complete
        assert not (tmp_path / "resumed" / "model" / "ema").exists()
    else:  # the child finished before the kill landed: nothing was interrupted, but still compare
        assert victim.returncode == 0, victim_log.read_text()[-3000:]
        logging.getLogger(__name__).warning("the training child finished before it could be killed")

    resumed, resumed_log = _start_child(script, args("resumed"), "resumed", tmp_path)
    assert resumed.wait(timeout=300) == 0, resumed_log.read_text()[-3000:]
    assert reference.wait(timeout=300) == 0, reference_log.read_text()[-3000:]
    if killed:
        assert "resumed from" in resumed_log.read_text()

    a, b = tmp_path / "uninterrupted", tmp_path / "resumed"
    # Exported weights: LoRA, EMA LoRA, align heads and EMA heads, bit for bit.
    for name in ("pytorch_lora_weights.safetensors", "align_heads.safetensors",
                 "ema/pytorch_lora_weights.safetensors", "ema/align_heads.safetensors"):
        assert_tensors_equal(load_file(a / "model" / name), load_file(b / "model" / name), name)
    # The final training state: model, EMA, optimiser moments and step, LR schedule, generator.
    state_a, state_b = state_of(a / "train_state"), state_of(b / "train_state")
    assert state_a.name == state_b.name  # one identity: the same settings, data and code
    final_a = checkpoint_state(state_a / "checkpoints" / "checkpoint-12")
    final_b = checkpoint_state(state_b / "checkpoints" / "checkpoint-12")
    assert_tensors_equal(final_a["model"], final_b["model"], "model.safetensors")
    assert final_a["ema"]["optimization_step"] == final_b["ema"]["optimization_step"] == 12
    assert len(final_a["ema"]["shadow_params"]) == len(final_b["ema"]["shadow_params"]) > 0
    for x, y in zip(final_a["ema"]["shadow_params"], final_b["ema"]["shadow_params"]):
        assert torch.equal(x, y)
    assert final_a["train"]["step"] == final_b["train"]["step"] == 12
    assert torch.equal(final_a["train"]["generator"], final_b["train"]["generator"])
    opt_a, opt_b = final_a["optimizer"]["state"], final_b["optimizer"]["state"]
    assert opt_a.keys() == opt_b.keys() and opt_a
    for index in opt_a:
        assert float(opt_a[index]["step"]) == float(opt_b[index]["step"]) == 12
        for moment in ("exp_avg", "exp_avg_sq"):
            assert torch.equal(opt_a[index][moment], opt_b[index][moment])
    assert final_a["scheduler"] == final_b["scheduler"]
    # The step log: every step exactly once, with the values the uninterrupted run logged.
    log_a, log_b = read_log(state_a), read_log(state_b)
    assert log_b["step"].tolist() == list(range(1, 13))
    columns = [c for c in LOG_COLUMNS if c != "step_time"]
    pd.testing.assert_frame_equal(log_a[columns], log_b[columns], check_exact=True)
    assert read_log(b / "model")["step"].tolist() == list(range(1, 13))


# -- 2. a NaN loss ------------------------------------------------------------------------------------
def test_nan_loss_stops_with_the_step_and_an_intact_last_checkpoint(data, tmp_path):
    settings = settings_for(max_steps=12, checkpoint_every=4, eval_interval=100)
    # A latent full of NaN in a row still marked valid, placed in the batch of step 5 (the first
    # after checkpoint-4; the sampler is a pure function of seed and step).
    vae_path = tmp_path / "vae_latents.zarr"
    vae = copy_cache(data["caches"]["vae"], vae_path)
    dino = zarr.open_group(str(data["caches"]["dino"]), mode="r")
    rows = valid_rows(vae, dino)
    batches = list(itertools.islice(iter(StepBatches(rows, BATCH, SEED)), 5))
    poisoned = int(batches[4][0])
    assert not any(poisoned in batch for batch in batches[:4])
    vae["mean"][poisoned] = np.nan
    assert poisoned in valid_rows(vae, dino)

    caches = {**data["caches"], "vae": vae_path}
    with pytest.raises(FloatingPointError) as error:
        run(data, settings, tmp_path / "run", caches)
    message = str(error.value)
    checkpoints = state_of(tmp_path / "run" / "train_state") / "checkpoints"
    assert "step 5" in message and str(checkpoints / "checkpoint-4") in message
    # The newest checkpoint is complete and is the last good one; no half-written folder is newest.
    assert sorted(p.name for p in checkpoints.iterdir()) == ["checkpoint-4"]
    assert not (tmp_path / "run" / "model").exists()
    saved = checkpoint_state(checkpoints / "checkpoint-4")
    assert all(torch.isfinite(v).all() for v in saved["model"].values())
    # ... and loadable: a new trainer resumes from it at step 4 with its weights.
    trainer = make_trainer(data, settings, checkpoints.parent, vae_path)
    assert trainer.resume() == 4
    assert trainer.ema.optimization_step == 4
    assert_tensors_equal(trainer.model.state_dict(), saved["model"], "resumed model")


# -- 3. the smoke tier learns the alignment ---------------------------------------------------------
@pytest.fixture(scope="module")
def smoke_run(data, tmp_path_factory) -> dict:
    """One run on the smoke tier's own settings (batch 8, 120 steps), shared by the tests below."""
    settings = train_settings(CONFIG, "smoke", "urepa")
    run_dir, model_dir = run(data, settings, tmp_path_factory.mktemp("smoke_run"))
    return {"settings": settings, "run_dir": run_dir, "model_dir": model_dir}


def test_smoke_run_lowers_the_token_loss(smoke_run):
    log = read_log(smoke_run["run_dir"])
    assert log["step"].tolist() == list(range(1, smoke_run["settings"]["max_steps"] + 1))
    assert np.isfinite(log[["loss", "loss_diff", "loss_token", "loss_manifold", "lr", "grad_norm"]].to_numpy()).all()
    first, last = log["loss_token"].iloc[:10].mean(), log["loss_token"].iloc[-10:].mean()
    # A random head starts near 1 (cosine ~ 0); at the smoke tier's lr 3e-3 the first ten steps already
    # average ~0.74 and the last ten ~0.5.
    assert log["loss_token"].iloc[0] > 0.9
    assert last < 0.8 * first, f"token loss went from {first:.3f} to {last:.3f}"


def test_alignment_analysis_of_the_run_does_not_depend_on_the_batch_size(smoke_run, data, smoke_inputs, tmp_path):
    val_csv = tmp_path / "val_subset.csv"
    build_subset(smoke_inputs["imagenet"], images_per_class=4, seed=0, split="val").to_csv(val_csv, index=False)
    clip = zarr.open_group(str(data["caches"]["clip"]), mode="r")["embeddings"][:]

    def analyse(batch_size: int) -> dict:
        return alignment_analysis(val_csv, data["sd15"], data["dinov2"], smoke_run["model_dir"] / "ema", clip,
                                  smoke_run["settings"], SMOKE_IMAGE_SIZE, DINO_SIZE, 12, [100, 500, 900], SEED, CPU,
                                  tmp_path / f"tsne-{batch_size}.png", batch_size=batch_size)

    whole, batched = analyse(32), analyse(5)
    assert whole["layer"] == "mid" and whole["has_head"] and whole["images"] == 12
    assert [e["timestep"] for e in whole["timesteps"]] == [100, 500, 900]
    for a, b in zip(whole["timesteps"], batched["timesteps"]):
        scores = {"cknna", "cca", "head_token_cosine", "head_cknna"}
        assert a.keys() == b.keys() >= scores | {f"{score}_chance" for score in scores}
        for key in a:
            assert a[key] == pytest.approx(b[key], rel=1e-4, abs=1e-5), key
    assert (tmp_path / "tsne-32.png").stat().st_size > 0
    # Every ablation is analysed at the mid block when it is aligned there, whatever else is.
    assert analysis_layer(["enc_last", "mid", "dec_first"]) == "mid" and analysis_layer(["dec_first"]) == "dec_first"


@pytest.fixture(scope="module")
def held_out_csv(data, tmp_path_factory) -> Path:
    """16 images per class of the training tree's classes, drawn apart from it (another seed): more
    held-out images than the shared tree's 4 per class, for a score that is not dominated by sampling."""
    root = tmp_path_factory.mktemp("held_out")
    tree = generated.make_imagenet_tree(root / "imagenet", classes=data["table"]["class_id"].nunique(),
                                        train_images=0, val_images=16, seed=1)
    build_subset(tree, images_per_class=16, seed=0, split="val").to_csv(root / "held_out.csv", index=False)
    return root / "held_out.csv"


def test_alignment_moves_the_mid_block_features_towards_dinov2(smoke_run, data, held_out_csv, tmp_path):
    """The alignment gradient reaches the U-Net, end to end: trained on the smoke tier's own settings, the
    urepa run's mid-block features of held-out images are closer to DINOv2's than those of the baseline
    trained alike without the alignment loss. Score: the pipeline's alignment analysis (EMA weights, pooled
    mid-block features, no head) -- CKNNA above its chance level, averaged over the analysis timesteps.
    CKNNA's chance level is far from 0 here (~0.19: 48 images of 3 classes, top-10 neighbours).

    Measured over training seeds 0-4 on this data, learning rate 3e-3: CKNNA above chance urepa
    0.31 +- 0.04 (0.25 to 0.36), baseline 0.03 +- 0.02 (0.00 to 0.04); paired difference 0.28 +- 0.05
    (0.22 at seed 0, the smallest). At learning rate 1e-3 the difference is 0.01 +- 0.05 (at most 0.07);
    with the feature hook detaching its output (the seed plan's bug), 0.00 at seed 0."""
    clip = zarr.open_group(str(data["caches"]["clip"]), mode="r")["embeddings"][:]
    images = len(pd.read_csv(held_out_csv))

    def held_out_cknna(model_dir: Path, settings: dict) -> tuple[float, float]:
        result = alignment_analysis(held_out_csv, data["sd15"], data["dinov2"], model_dir / "ema", clip, settings,
                                    SMOKE_IMAGE_SIZE, DINO_SIZE, images,
                                    CONFIG["evaluate"]["analysis_timesteps"], SEED, CPU, tmp_path / "tsne.png")
        assert result["images"] == images == 48 and result["layer"] == "mid"
        return (float(np.mean([entry["cknna"] for entry in result["timesteps"]])),
                float(np.mean([entry["cknna_chance"] for entry in result["timesteps"]])))

    baseline_settings = train_settings(CONFIG, "smoke", "baseline")
    assert {k: v for k, v in baseline_settings.items() if k != "align_coeff"} == \
        {k: v for k, v in smoke_run["settings"].items() if k != "align_coeff"}
    _, baseline_dir = run(data, baseline_settings, tmp_path / "baseline")
    aligned, aligned_chance = held_out_cknna(smoke_run["model_dir"], smoke_run["settings"])
    plain, plain_chance = held_out_cknna(baseline_dir, baseline_settings)
    scores = f"urepa {aligned:.3f} (chance {aligned_chance:.3f}), baseline {plain:.3f} (chance {plain_chance:.3f})"
    # Without the alignment loss the features hold little more of DINOv2's structure than chance ...
    assert abs(plain - plain_chance) < 0.1, scores
    # ... with it, clearly more: 3x the seed-to-seed spread of the difference.
    assert (aligned - aligned_chance) - (plain - plain_chance) > 0.15, scores


# -- 4. artifacts -----------------------------------------------------------------------------------
def _unet_input(data):
    clip = zarr.open_group(str(data["caches"]["clip"]), mode="r")
    generator = torch.Generator().manual_seed(1)
    sample = torch.randn(2, 4, SMOKE_IMAGE_SIZE // 8, SMOKE_IMAGE_SIZE // 8, generator=generator)
    timesteps = torch.tensor([50, 700])
    hidden = torch.from_numpy(clip["embeddings"][[0, clip.attrs["null_index"]]]).float()
    return sample, timesteps, hidden


def test_lora_artifacts_load_into_diffusers_and_reproduce_the_trained_unet(data, smoke_run):
    from diffusers import StableDiffusionPipeline

    settings, model_dir = smoke_run["settings"], smoke_run["model_dir"]
    final = smoke_run["run_dir"] / "checkpoints" / f"checkpoint-{settings['max_steps']}"
    saved = checkpoint_state(final)
    inputs = _unet_input(data)

    trained = rebuild_model(data, settings, saved["model"])
    expected = unet_prediction(trained.unet, inputs)
    # The EMA weights: the checkpointed shadow parameters in the trainable parameters' order.
    trainable = [p for p in trained.parameters() if p.requires_grad]
    assert len(trainable) == len(saved["ema"]["shadow_params"])
    with torch.no_grad():
        for parameter, shadow in zip(trainable, saved["ema"]["shadow_params"]):
            parameter.copy_(shadow)
    expected_ema = unet_prediction(trained.unet, inputs)

    pipeline = StableDiffusionPipeline.from_pretrained(str(data["sd15"]), local_files_only=True)
    base = unet_prediction(pipeline.unet, inputs)
    pipeline.load_lora_weights(str(model_dir), adapter_name="trained")
    pipeline.load_lora_weights(str(model_dir / "ema"), adapter_name="ema")
    pipeline.set_adapters("trained")
    loaded = unet_prediction(pipeline.unet, inputs)
    pipeline.set_adapters("ema")
    loaded_ema = unet_prediction(pipeline.unet, inputs)

    # Every adapted module of the trained U-Net is adapted in the loaded one (none silently dropped).
    def adapted(unet):
        return {name.rsplit(".lora_", 1)[0] for name, _ in unet.named_parameters() if ".lora_" in name}

    assert adapted(pipeline.unet) == adapted(trained.unet) and adapted(trained.unet)
    assert (loaded - base).abs().max() > 1e-3, "the trained LoRA does not change the U-Net"
    assert (loaded_ema - base).abs().max() > 1e-3, "the EMA LoRA does not change the U-Net"
    torch.testing.assert_close(loaded, expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(loaded_ema, expected_ema, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(loaded, loaded_ema)
    # LoRA only in the white-listed blocks of the exported file.
    lora = load_file(model_dir / "pytorch_lora_weights.safetensors")
    assert lora and all(k.startswith(tuple(f"unet.{b}." for b in TRAINABLE_BLOCKS)) for k in lora)
    assert any(v.abs().max() > 0 for k, v in lora.items() if "lora_B" in k or "lora.up" in k)

    # The align heads, separately, with what is needed to rebuild them.
    heads = load_file(model_dir / "align_heads.safetensors")
    assert_tensors_equal(heads, {k[len("heads."):]: v for k, v in saved["model"].items() if k.startswith("heads.")},
                         "align heads")
    assert load_file(model_dir / "ema" / "align_heads.safetensors").keys() == heads.keys()
    meta = json.loads((model_dir / "align_heads.json").read_text())
    assert meta["layers"] == ["mid"] and meta["grid"] == 4 and meta["dim"] == 64
    assert meta["projector"] == settings["projector"]

    # An EMA snapshot at every eval_interval step.
    every = settings["eval_interval"]
    steps = range(every, settings["max_steps"] + 1, every)
    assert sorted(p.name for p in (model_dir / "snapshots").iterdir()) == [f"step-{s:07d}" for s in steps]
    for step in steps:
        assert (model_dir / "snapshots" / f"step-{step:07d}" / "pytorch_lora_weights.safetensors").is_file()
    last_snapshot = model_dir / "snapshots" / f"step-{settings['max_steps']:07d}" / "pytorch_lora_weights.safetensors"
    assert_tensors_equal(load_file(last_snapshot), load_file(model_dir / "ema" / "pytorch_lora_weights.safetensors"),
                         "final snapshot vs EMA export")


def test_exported_folder_loads_into_a_stock_pipeline_with_its_parameterisation(data, smoke_run, tmp_path):
    """The README's three lines give a stock StableDiffusionPipeline the run's EMA weights and the scheduler
    they were trained for; unguided, it then makes the very images our own sampler makes."""
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    from urepa.caches import directory_digest
    from urepa.sample import generate_samples, initial_noise, load_finetuned_pipeline

    ema = smoke_run["model_dir"] / "ema"
    pipe = StableDiffusionPipeline.from_pretrained(str(data["sd15"]), safety_checker=None, local_files_only=True)
    pipe.load_lora_weights(str(ema))
    pipe.scheduler = DDIMScheduler.from_pretrained(str(ema), subfolder="scheduler")
    assert smoke_run["settings"]["prediction"] == "epsilon"  # the default: SD-1.5 is an epsilon model
    assert pipe.scheduler.config.prediction_type == "epsilon"
    torch.testing.assert_close(pipe.scheduler.alphas_cumprod,
                               DDIMScheduler.from_pretrained(str(data["sd15"]), subfolder="scheduler").alphas_cumprod)

    clip = zarr.open_group(str(data["caches"]["clip"]), mode="r")
    embeddings = clip["embeddings"][:]
    settings = {"sampler": "ddim", "steps": 3, "cfg_scale": 1.0, "guidance_low": 0.0, "guidance_high": 1.0}
    ours = generate_samples(load_finetuned_pipeline(data["sd15"], ema, "lora", CPU), embeddings,
                            clip.attrs["null_index"], num_classes=1, images_per_class=2, out_dir=tmp_path / "ours",
                            settings=settings, seed=3, batch_size=2, weights_digest=directory_digest(ema))
    size = SMOKE_IMAGE_SIZE // 8
    noise = torch.stack([initial_noise(i, 3, (4, size, size)) for i in range(2)])
    stock = pipe(prompt_embeds=torch.from_numpy(embeddings[[0, 0]]).float(), num_inference_steps=3, guidance_scale=1.0,
                 latents=noise, output_type="np").images
    for i in range(2):
        ours_image = np.asarray(Image.open(ours / f"{i:06d}.png"), dtype=np.int16)
        assert np.abs(ours_image - np.round(stock[i] * 255).astype(np.int16)).max() <= 1


def test_v_prediction_is_exported_with_its_scheduler_and_warned_about_with_lora(data, tmp_path, caplog):
    from diffusers import DDIMScheduler

    settings = settings_for(prediction="v", max_steps=2, checkpoint_every=2, eval_interval=2)
    with caplog.at_level(logging.WARNING):
        _, model_dir = run(data, settings, tmp_path)
    assert "prediction 'v' with LoRA" in caplog.text and "epsilon model" in caplog.text
    for folder in (model_dir, model_dir / "ema", model_dir / "snapshots" / "step-0000002"):
        scheduler = DDIMScheduler.from_pretrained(str(folder), subfolder="scheduler")
        assert scheduler.config.prediction_type == "v_prediction", folder


def test_partial_finetune_exports_a_unet_that_differs_only_in_the_three_blocks(data, tmp_path):
    from diffusers import UNet2DConditionModel

    settings = settings_for(finetune="partial", max_steps=3, checkpoint_every=3, eval_interval=3)
    _, model_dir = run(data, settings, tmp_path)
    assert not (model_dir / "pytorch_lora_weights.safetensors").exists()
    base = load_unet(data["sd15"]).state_dict()
    for folder in (model_dir / "unet", model_dir / "ema" / "unet"):
        trained = UNet2DConditionModel.from_pretrained(str(folder), local_files_only=True).state_dict()
        assert trained.keys() == base.keys()
        changed = {name for name in base if not torch.equal(base[name], trained[name])}
        assert changed and all(name.startswith(tuple(b + "." for b in TRAINABLE_BLOCKS)) for name in changed)
        for block in TRAINABLE_BLOCKS:
            assert any(name.startswith(block + ".") for name in changed), f"{block} did not change"


# -- 5. baseline ------------------------------------------------------------------------------------
def test_baseline_builds_no_heads_or_hooks_and_logs_no_token_loss(data, tmp_path):
    settings = settings_for("baseline", max_steps=3, checkpoint_every=3, eval_interval=3)
    assert settings["align_coeff"] == 0
    trainer = make_trainer(data, settings, tmp_path / "inspect")
    model = trainer.accelerator.unwrap_model(trainer.model)
    assert len(model.heads) == 0 and model.capture is None
    assert not any(m._forward_hooks for m in model.modules())
    assert all(".lora_" in n for n, p in model.named_parameters() if p.requires_grad)
    # (the U-REPA run of the same tier does register its hook: the check above can fail)
    aligned = trainer.accelerator.unwrap_model(make_trainer(data, settings_for(), tmp_path / "aligned").model)
    assert len(aligned.heads) == 1 and any(m._forward_hooks for m in aligned.unet.modules())

    run_dir, model_dir = run(data, settings, tmp_path / "run")
    log = read_log(run_dir)
    assert log["step"].tolist() == [1, 2, 3]
    assert log["loss_token"].isna().all() and log["loss_manifold"].isna().all()
    assert (log["align_coeff"] == 0).all()
    assert np.array_equal(log["loss"].to_numpy(), log["loss_diff"].to_numpy())
    assert not (model_dir / "align_heads.safetensors").exists() and not (model_dir / "align_heads.json").exists()
    assert (model_dir / "pytorch_lora_weights.safetensors").is_file()


# -- 6. caches from another encoder -----------------------------------------------------------------
def test_dino_cache_from_another_encoder_is_refused_before_training(data, tmp_path):
    other = generated.make_dinov2(tmp_path / "other_dinov2", seed=1)
    settings = settings_for(max_steps=2)
    run_dir = tmp_path / "run" / "train_state"
    with pytest.raises(CacheMismatchError, match="encoder_fingerprint"):
        train_run({k: str(v) for k, v in data["caches"].items()}, str(data["sd15"]), str(other), settings,
                  run_dir, tmp_path / "run" / "model", SEED, CPU, 0, "test", **VIEW)
    assert not run_dir.exists()


def test_dino_cache_of_another_view_is_refused_before_training(data, tmp_path):
    """A token cache of another DINOv2 view (here: the VAE's square seen at 2x the size) is not reused."""
    settings = settings_for(max_steps=2)
    run_dir = tmp_path / "run" / "train_state"
    with pytest.raises(CacheMismatchError, match="view"):
        train_run({k: str(v) for k, v in data["caches"].items()}, str(data["sd15"]), str(data["dinov2"]), settings,
                  run_dir, tmp_path / "run" / "model", SEED, CPU, 0, "test",
                  image_size=SMOKE_IMAGE_SIZE, dino_size=2 * DINO_SIZE)
    assert not run_dir.exists()


# -- 7. the step sampler and invalid rows -----------------------------------------------------------
def _take(sampler: StepBatches, n: int) -> list[np.ndarray]:
    return list(itertools.islice(iter(sampler), n))


def test_step_batches_are_a_pure_function_of_seed_and_step():
    rows = np.setdiff1d(np.arange(30), [3, 17])  # 28 rows: 7 batches of 4 per epoch
    run = _take(StepBatches(rows, BATCH, seed=5), 30)
    again = _take(StepBatches(rows, BATCH, seed=5), 30)
    assert all(np.array_equal(a, b) for a, b in zip(run, again))
    other_seed = _take(StepBatches(rows, BATCH, seed=6), 30)
    assert not all(np.array_equal(a, b) for a, b in zip(run, other_seed))
    for start in (1, 6, 7, 13, 20):  # inside and across epoch boundaries
        resumed = _take(StepBatches(rows, BATCH, seed=5, start_step=start), 30 - start)
        assert all(np.array_equal(a, b) for a, b in zip(resumed, run[start:]))
    for batch in run:
        assert len(batch) == BATCH and len(set(batch.tolist())) == BATCH and np.isin(batch, rows).all()
    # an epoch visits every valid row at most once, and successive epochs are shuffled differently
    epoch0, epoch1 = np.concatenate(run[:7]), np.concatenate(run[7:14])
    assert sorted(epoch0.tolist()) == sorted(rows.tolist()) == sorted(epoch1.tolist())
    assert not np.array_equal(epoch0, epoch1)
    # two processes split each global batch between them
    halves = [_take(StepBatches(rows, BATCH, seed=5, rank=r, world_size=2), 10) for r in (0, 1)]
    for step in range(10):
        assert np.array_equal(np.concatenate([halves[0][step], halves[1][step]]), run[step])
    with pytest.raises(ValueError, match="only 3 valid cached rows for a batch of 4"):
        StepBatches(rows[:3], BATCH, seed=5)
    exactly_one_batch = _take(StepBatches(rows[:BATCH], BATCH, seed=5), 2)  # an epoch of one batch
    assert all(sorted(batch.tolist()) == rows[:BATCH].tolist() for batch in exactly_one_batch)


@pytest.mark.parametrize("invalid_in", ["vae", "dino"])
def test_training_skips_rows_marked_invalid(data, tmp_path, caplog, invalid_in):
    """A row either encoder failed on (marked invalid in its cache, NaN data) is never trained on."""
    # The row the first batch would hold if invalid rows were not skipped.
    num_rows = len(data["table"])
    skipped = int(_take(StepBatches(np.arange(num_rows), BATCH, SEED), 1)[0][0])
    path = tmp_path / Path(data["caches"][invalid_in]).name
    cache = copy_cache(data["caches"][invalid_in], path)
    cache["mean" if invalid_in == "vae" else "tokens"][skipped] = np.nan
    cache["valid"][skipped] = False
    caches = {**data["caches"], invalid_in: path}
    settings = settings_for(max_steps=2, checkpoint_every=2, eval_interval=2)
    with caplog.at_level(logging.WARNING, logger="urepa.train"):
        run_dir, model_dir = run(data, settings, tmp_path / "run", caches)
    assert f"skipping 1 invalid cached rows of {num_rows}" in caplog.text
    assert np.isfinite(read_log(run_dir)["loss"]).all()
    assert json.loads((model_dir / "config.json").read_text())["trained_rows"] == num_rows - 1
    if invalid_in == "dino":
        return
    # and the trainer's own data loader never hands the row out, over several epochs
    trainer = make_trainer(data, settings, tmp_path / "inspect", path)
    seen = np.concatenate([batch["row"].numpy() for batch in itertools.islice(iter(trainer.batches(0)), 20)])
    assert skipped not in seen and len(np.unique(seen)) == num_rows - 1


def test_a_rebuilt_cache_retrains_instead_of_re_exporting_the_finished_state(data, tmp_path, caplog):
    """Same settings, CSV, encoders and code, but the cache was rebuilt and one image is now invalid: the
    finished state belongs to other data, so the run trains anew on the new rows, beside it."""
    settings = settings_for(max_steps=2, checkpoint_every=2, eval_interval=2)
    vae_path = tmp_path / "vae_latents.zarr"
    copy_cache(data["caches"]["vae"], vae_path)
    caches = {**data["caches"], "vae": vae_path}
    run_dir, model_dir = run(data, settings, tmp_path / "run", caches)
    first = load_file(model_dir / "ema" / "pytorch_lora_weights.safetensors")
    vae = zarr.open_group(str(vae_path), mode="r+")
    vae["valid"][0] = False
    vae.attrs["errors"] = [{"row": 0, "error": "OSError: image file is truncated"}]
    with caplog.at_level(logging.INFO, logger="urepa.train"):
        second_run_dir, _ = run(data, settings, tmp_path / "run", caches)
    assert (f"run state {second_run_dir}: new identity, training from step 0 (states of other identities kept "
            f"beside it: {run_dir.name})") in caplog.text
    assert second_run_dir != run_dir and (run_dir / "checkpoints" / "checkpoint-2").is_dir()  # kept
    assert json.loads((second_run_dir / "run.json").read_text())["caches"]["vae"] != \
        json.loads((run_dir / "run.json").read_text())["caches"]["vae"]
    assert json.loads((model_dir / "config.json").read_text())["trained_rows"] == len(data["table"]) - 1
    second = load_file(model_dir / "ema" / "pytorch_lora_weights.safetensors")
    assert any(not torch.equal(first[k], second[k]) for k in first), "the old weights were re-exported"


@pytest.mark.parametrize("report_to", ["tensorboard", "none"])
def test_experiment_tracking_is_selectable(data, tmp_path, report_to):
    settings = settings_for(max_steps=2, checkpoint_every=2, eval_interval=2)
    run_dir = train_run({k: str(v) for k, v in data["caches"].items()}, str(data["sd15"]), str(data["dinov2"]),
                        settings, tmp_path / "train_state", tmp_path / "model", SEED, CPU, 0, "test", **VIEW,
                        report_to=report_to)
    events = list((run_dir / "tensorboard").rglob("events.out.tfevents.*"))
    assert bool(events) == (report_to == "tensorboard")
    if events:
        from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

        accumulator = EventAccumulator(str(events[0].parent)).Reload()
        assert [e.step for e in accumulator.Scalars("loss_token")] == [1, 2]


def test_run_states_are_kept_by_identity_and_a_reverted_setting_reuses_its_finished_run(data, tmp_path, caplog):
    """Change a setting, then change it back: the first run's finished state is found again and re-exported
    as it was (no step trained again), while the other setting's run keeps its own state."""
    settings = settings_for(max_steps=2, checkpoint_every=2, eval_interval=2)
    first_dir, model_dir = run(data, settings, tmp_path)
    first = load_file(model_dir / "ema" / "pytorch_lora_weights.safetensors")
    other_dir, _ = run(data, {**settings, "align_coeff": 0.5}, tmp_path)
    assert other_dir != first_dir and json.loads((other_dir / "run.json").read_text())["settings"]["align_coeff"] == 0.5
    finished = (first_dir / "checkpoints" / "checkpoint-2" / "model.safetensors").stat().st_mtime_ns
    with caplog.at_level(logging.INFO, logger="urepa.train"):
        reverted_dir, _ = run(data, settings, tmp_path)
    assert reverted_dir == first_dir and f"run state {first_dir}: this identity's state, resumed" in caplog.text
    assert (first_dir / "checkpoints" / "checkpoint-2" / "model.safetensors").stat().st_mtime_ns == finished
    assert read_log(first_dir)["step"].tolist() == [1, 2]
    assert_tensors_equal(load_file(model_dir / "ema" / "pytorch_lora_weights.safetensors"), first, "re-exported EMA")
    assert sorted(p.parent for p in (tmp_path / "train_state").glob("*/run.json")) == sorted([first_dir, other_dir])
    # run.json: each start of the run, how it was launched and the step it trained from
    launches = json.loads((first_dir / "run.json").read_text())["launches"]
    assert [launch["from_step"] for launch in launches] == [0, 2]
    assert all(launch["processes"] == 1 and launch["grad_accum"] == settings["grad_accum"] and
               launch["mixed_precision"] == settings["mixed_precision"] and launch["device"] == "cpu" and
               launch["torch"] == torch.__version__ for launch in launches)
    # The model folder records how it was made, and the loss curve
    config = json.loads((model_dir / "config.json").read_text())
    assert config["run_state"] == str(first_dir) and config["launches"] == launches
    assert config["settings"] == settings and config["seed"] == SEED and config["final_step"] == 2
    assert config["sd15_dir"] == str(data["sd15"]) and config["dinov2"] == str(data["dinov2"])
    assert config["caches"] == {k: str(v) for k, v in data["caches"].items()}
    assert config["trained_rows"] == len(data["table"]) and (config["token_grid"], config["token_dim"]) == (4, 64)
    assert (model_dir / "loss_curve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert pd.read_csv(model_dir / "train_log.csv").equals(read_log(first_dir))


def test_a_clip_cache_of_another_width_is_refused_before_training(data, tmp_path):
    clip_path = tmp_path / "clip_embeddings.zarr"
    copy_cache(data["caches"]["clip"], clip_path).attrs["dim"] = 77
    with pytest.raises(ValueError, match="CLIP cache dim 77 does not match the U-Net's cross-attention dim 32"):
        run(data, settings_for(max_steps=2), tmp_path / "run", {**data["caches"], "clip": clip_path})
    assert not list((tmp_path / "run").glob("train_state/*"))


def test_a_run_state_is_named_by_its_identity_whatever_the_key_order(tmp_path):
    identity = {"settings": {"lr": 1e-4, "align_coeff": 0.8}, "seed": 0}
    reordered = {"seed": 0, "settings": {"align_coeff": 0.8, "lr": 1e-4}}
    assert run_state_dir(tmp_path, identity) == run_state_dir(tmp_path, reordered)
    assert run_state_dir(tmp_path, identity) != run_state_dir(tmp_path, {**identity, "seed": 1})
    assert run_state_dir(tmp_path, identity).parent == tmp_path


def test_a_state_folder_recording_another_identity_is_set_aside(tmp_path, caplog):
    identity, launch = {"settings": {"align_coeff": 0.8}, "seed": 0}, {"processes": 1}
    squatter = run_state_dir(tmp_path, identity)
    (squatter / "checkpoints" / "checkpoint-4").mkdir(parents=True)
    (squatter / "run.json").write_text(json.dumps({"settings": {"align_coeff": 0.5}, "seed": 0, "launches": [{}]}))
    with caplog.at_level(logging.WARNING):
        claimed = claim_run_state(tmp_path, identity, launch)
    assert claimed == squatter and f"{squatter} records another identity than its name says" in caplog.text
    (stale,) = tmp_path.glob(f"{squatter.name}.stale-*")
    assert (stale / "checkpoints" / "checkpoint-4").is_dir()  # kept, not deleted
    recorded = json.loads((claimed / "run.json").read_text())
    assert recorded == {**identity, "launches": [{"processes": 1, "from_step": 0}]}
