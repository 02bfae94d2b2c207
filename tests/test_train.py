"""Stage 3: the training loop (urepa.train) -- kill-and-resume equals an uninterrupted run, NaN stops with the last
good checkpoint intact, the smoke tier lowers the token loss and moves the U-Net's own features towards DINOv2's
(against a baseline run), diffusers-loadable artifacts, the baseline ablation, cache/encoder mismatch, invalid rows
and run states; and the wiring of `Trainer.step`, pinned against values computed here from what the step itself
drew.

The subset and the three caches are conftest's `smoke_caches`, at the sizes the smoke tier uses: VAE at
128 px (latents 4x16x16), DINOv2 on the same square at 56 px (a 4x4 token grid), CLIP for the tree's classes. Runs
are tiny (batch 4, a few steps) except the one smoke-tier run (conftest's `smoke_run`) that checks the token loss
goes down, whose artifacts the artifact and alignment tests reuse (marked slow, with the kill-and-resume test in
child processes: minutes each).

A step is observed from outside: a forward hook on the trained model records its inputs (noisy latents,
timesteps, text conditions) and outputs (prediction, aligned tokens); the batch is one the test built.
From those, the expected diffusion target, losses and conditions are recomputed by hand (numpy, SD-1.5's
schedule from its betas), so a step that draws, routes or weights something wrongly fails here even when
the loss still goes down.
"""
from __future__ import annotations

import itertools
import json
import logging
import math
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

from conftest import (CONFIG, CPU, DINO_SIZE, REPO, SEED, SMOKE_IMAGE_SIZE, TRAIN_BATCH, VIEW, batch_of,
                      make_trainer, run_training, settings_for, unet_prediction)
from test_batches import take_batches
from urepa import generated, losses, rowstore
from urepa.analysis import alignment_analysis
from urepa.batches import StepBatches
from urepa.config import train_settings
from urepa.models import TRAINABLE_BLOCKS, AlignedUNet, make_trainable
from urepa.rowstore import CacheMismatchError, valid_rows
from urepa.sd15 import load_noise_scheduler, load_unet
from urepa.subset import build_subset
from urepa.runstate import complete_checkpoints, trained_state_names
from urepa.train import LOG_COLUMNS, LOSS_TERMS, Trainer, train_run
from urepa.vae import LatentNormalisation, VaeMismatchError

BATCH = TRAIN_BATCH


def state_of(states_dir: Path) -> Path:
    """The one run state (identity folder) under a train_state/ folder."""
    (state,) = [marker.parent for marker in states_dir.glob("*/run.json")]
    return state


def rebuild_model(data, settings, state: dict[str, torch.Tensor]) -> AlignedUNet:
    """The trained model (U-Net + LoRA + heads) from a checkpoint's model.safetensors: its trained tensors, every
    one of them, into SD-1.5's U-Net."""
    dino = zarr.open_group(str(data["caches"]["dino"]), mode="r")
    unet = load_unet(data["sd15"])
    make_trainable(unet, settings["finetune"], settings["lora_rank"], settings["lora_targets"])
    model = AlignedUNet(unet, settings["align_layers"], dino.attrs["dim"], dino.attrs["grid"],
                        settings["projector"], settings["projector_hidden"])
    assert state.keys() == trained_state_names(model)
    model.load_state_dict(state, strict=False)
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
train_run(a["caches"], a["sd15"], a["dinov2"], a["vae_dir"], a["settings"], a["run_dir"], a["model_dir"],
          a["seed"], torch.device("cpu"), 0, "resume test", image_size=a["image_size"], dino_size=a["dino_size"])
"""


def _start_child(script: Path, args: dict, name: str, tmp_path: Path) -> tuple[subprocess.Popen, Path]:
    args_file, log_path = tmp_path / f"{name}.json", tmp_path / f"{name}.log"
    args_file.write_text(json.dumps(args))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    with open(log_path, "wb") as log_file:
        process = subprocess.Popen([sys.executable, str(script), str(args_file)], stdout=log_file,
                                   stderr=subprocess.STDOUT, env=env)
    return process, log_path


def child_runs(data, settings: dict, tmp_path: Path):
    """The training child's script, and its arguments for a run named `name` (folders under tmp_path/name)."""
    script = tmp_path / "child.py"
    script.write_text(CHILD)

    def args(name: str) -> dict:
        return {"caches": {k: str(v) for k, v in data["caches"].items()}, "sd15": str(data["sd15"]),
                "dinov2": str(data["dinov2"]), "vae_dir": str(data["vae_dir"]), "settings": settings, "seed": SEED,
                **VIEW, "run_dir": str(tmp_path / name / "train_state"), "model_dir": str(tmp_path / name / "model")}

    return script, args


@pytest.mark.slow  # two training processes, one killed and resumed: minutes
@pytest.mark.parametrize("finetune", ["lora", "partial"])
def test_killed_and_resumed_run_equals_an_uninterrupted_one(data, tmp_path, finetune):
    script, args = child_runs(data, settings_for(max_steps=12, checkpoint_every=4, eval_interval=4, finetune=finetune),
                              tmp_path)

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

    assert_same_run_bit_for_bit(tmp_path / "uninterrupted", tmp_path / "resumed", steps=12)


@pytest.mark.slow  # two training processes, one stopped by SIGTERM and resumed: a minute
def test_a_signalled_run_checkpoints_its_step_exits_non_zero_and_resumes_without_repeating_a_step(data, tmp_path):
    """Slurm's preemption (SIGTERM): the run finishes its step, writes a checkpoint of it (between the regular ones),
    exits non-zero so the job is retried, and the rerun resumes from that step. (SIGUSR1 is noted alike:
    tests/test_runstate.py.)"""
    stop_signal = signal.SIGTERM
    script, args = child_runs(data, settings_for(max_steps=8, checkpoint_every=8, eval_interval=2), tmp_path)

    reference, reference_log = _start_child(script, args("uninterrupted"), "uninterrupted", tmp_path)
    victim, victim_log = _start_child(script, args("resumed"), "signalled", tmp_path)
    states = tmp_path / "resumed" / "train_state"
    deadline = time.monotonic() + 300
    while not any(states.glob("*/snapshots/step-0000002")) and time.monotonic() < deadline:
        assert victim.poll() is None, victim_log.read_text()[-3000:]
        time.sleep(0.01)
    victim.send_signal(stop_signal)
    assert victim.wait(timeout=300) not in (0, -stop_signal), victim_log.read_text()[-3000:]
    (checkpoint,) = complete_checkpoints(state_of(states))
    stopped_at = int(checkpoint.name.split("-")[1])
    assert 2 <= stopped_at < 8  # a checkpoint no schedule asked for: the step the signal arrived in
    assert f"stopped by {stop_signal.name} after step {stopped_at}" in victim_log.read_text()
    assert read_log(state_of(states))["step"].tolist() == list(range(1, stopped_at + 1))

    resumed, resumed_log = _start_child(script, args("resumed"), "resumed", tmp_path)
    assert resumed.wait(timeout=300) == 0, resumed_log.read_text()[-3000:]
    assert reference.wait(timeout=300) == 0, reference_log.read_text()[-3000:]
    launches = json.loads((state_of(states) / "run.json").read_text())["launches"]
    assert [launch["from_step"] for launch in launches] == [0, stopped_at]  # no step trained twice
    assert_same_run_bit_for_bit(tmp_path / "uninterrupted", tmp_path / "resumed", steps=8)


def assert_same_run_bit_for_bit(a: Path, b: Path, steps: int) -> None:
    """Two runs' exported weights, final training state and step logs, equal bit for bit."""
    # Exported weights (LoRA or U-Net, align heads, each of them as trained and EMA) and snapshots, bit for bit.
    exported = sorted(str(p.relative_to(a / "model")) for p in (a / "model").rglob("*.safetensors"))
    assert {"align_heads.safetensors", "ema/align_heads.safetensors"} < set(exported)
    assert exported == sorted(str(p.relative_to(b / "model")) for p in (b / "model").rglob("*.safetensors"))
    for name in exported:
        assert_tensors_equal(load_file(a / "model" / name), load_file(b / "model" / name), name)
    # The final training state: model, EMA, optimiser moments and step, LR schedule, generator.
    state_a, state_b = state_of(a / "train_state"), state_of(b / "train_state")
    assert state_a.name == state_b.name  # one identity: the same settings, data and code
    final_a = checkpoint_state(state_a / "checkpoints" / f"checkpoint-{steps}")
    final_b = checkpoint_state(state_b / "checkpoints" / f"checkpoint-{steps}")
    assert_tensors_equal(final_a["model"], final_b["model"], "model.safetensors")
    assert final_a["ema"]["optimization_step"] == final_b["ema"]["optimization_step"] == steps
    assert len(final_a["ema"]["shadow_params"]) == len(final_b["ema"]["shadow_params"]) > 0
    for x, y in zip(final_a["ema"]["shadow_params"], final_b["ema"]["shadow_params"]):
        assert torch.equal(x, y)
    assert final_a["train"]["step"] == final_b["train"]["step"] == steps
    assert torch.equal(final_a["train"]["generator"], final_b["train"]["generator"])
    opt_a, opt_b = final_a["optimizer"]["state"], final_b["optimizer"]["state"]
    assert opt_a.keys() == opt_b.keys() and opt_a
    for index in opt_a:
        assert float(opt_a[index]["step"]) == float(opt_b[index]["step"]) == steps
        for moment in ("exp_avg", "exp_avg_sq"):
            assert torch.equal(opt_a[index][moment], opt_b[index][moment])
    assert final_a["scheduler"] == final_b["scheduler"]
    # The step log: every step exactly once, with the values the uninterrupted run logged.
    log_a, log_b = read_log(state_a), read_log(state_b)
    assert log_b["step"].tolist() == list(range(1, steps + 1))
    columns = [c for c in LOG_COLUMNS if c != "step_time"]
    pd.testing.assert_frame_equal(log_a[columns], log_b[columns], check_exact=True)
    assert read_log(b / "model")["step"].tolist() == list(range(1, steps + 1))


# -- 2. a NaN loss ------------------------------------------------------------------------------------


def test_nan_loss_stops_with_the_step_and_an_intact_last_checkpoint(data, tmp_path):
    settings = settings_for(max_steps=12, checkpoint_every=4, eval_interval=100)
    # A latent full of NaN in a row still marked valid, placed in the batch of step 5 (the first
    # after checkpoint-4; the sampler is a pure function of seed and step). Written with its checksum, as an
    # encoder that produced NaN would have: the row reads back as written, and the loss must catch it.
    vae_path = tmp_path / "vae_latents.zarr"
    vae = copy_cache(data["caches"]["vae"], vae_path)
    dino = zarr.open_group(str(data["caches"]["dino"]), mode="r")
    rows = valid_rows(vae, dino)
    batches = list(itertools.islice(iter(StepBatches(rows, BATCH, SEED)), 5))
    poisoned = int(batches[4][0])
    assert not any(poisoned in batch for batch in batches[:4])
    vae["mean"][poisoned] = np.nan
    rowstore.write_row_checksums(vae, poisoned, poisoned + 1,
                                 {name: vae[name][poisoned:poisoned + 1] for name in ("mean", "std")})
    assert poisoned in valid_rows(vae, dino)

    caches = {**data["caches"], "vae": vae_path}
    with pytest.raises(FloatingPointError) as error:
        run_training(data, settings, tmp_path / "run", caches)
    message = str(error.value)
    checkpoints = state_of(tmp_path / "run" / "train_state") / "checkpoints"
    assert "step 5" in message and str(checkpoints / "checkpoint-4") in message
    # The newest checkpoint is complete and is the last good one; no half-written folder is newest.
    assert sorted(p.name for p in checkpoints.iterdir()) == ["checkpoint-4"]
    assert not (tmp_path / "run" / "model").exists()
    saved = checkpoint_state(checkpoints / "checkpoint-4")
    assert all(torch.isfinite(v).all() for v in saved["model"].values())
    # ... and loadable: a new trainer resumes from it at step 4 with its weights.
    trainer = make_trainer(data, settings, checkpoints.parent, vae_path, report_to="tensorboard")
    assert trainer.resume() == 4
    assert trainer.ema.optimization_step == 4
    resumed = trainer.model.state_dict()
    assert_tensors_equal({name: resumed[name] for name in saved["model"]}, saved["model"], "resumed model")


# -- 3. the smoke tier learns the alignment ---------------------------------------------------------


@pytest.mark.slow  # the smoke tier's 120-step run: minutes
def test_smoke_run_lowers_the_token_loss(smoke_run):
    log = read_log(smoke_run["run_dir"])
    assert log["step"].tolist() == list(range(1, smoke_run["settings"]["max_steps"] + 1))
    assert np.isfinite(log[["loss", "loss_diff", "loss_token", "loss_manifold", "lr", "grad_norm"]].to_numpy()).all()
    first, last = log["loss_token"].iloc[:10].mean(), log["loss_token"].iloc[-10:].mean()
    # A random head starts near 1 (cosine ~ 0); at the smoke tier's lr 3e-3 the first ten steps already
    # average ~0.74 and the last ten ~0.5.
    assert log["loss_token"].iloc[0] > 0.9
    assert last < 0.8 * first, f"token loss went from {first:.3f} to {last:.3f}"


@pytest.fixture(scope="module")
def held_out_csv(data, tmp_path_factory) -> Path:
    """16 images per class of the training tree's classes, drawn apart from it (another seed): more
    held-out images than the shared tree's 4 per class, for a score that is not dominated by sampling."""
    root = tmp_path_factory.mktemp("held_out")
    tree = generated.make_imagenet_tree(root / "imagenet", classes=data["table"]["class_id"].nunique(),
                                        train_images=0, val_images=16, seed=1)
    build_subset(tree, images_per_class=16, seed=0, split="val").to_csv(root / "held_out.csv", index=False)
    return root / "held_out.csv"


@pytest.mark.slow  # two 120-step runs: minutes
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

    def held_out_cknna(model_dir: Path) -> tuple[float, float]:
        result = alignment_analysis(held_out_csv, data["sd15"], data["dinov2"], model_dir / "ema", clip,
                                    SMOKE_IMAGE_SIZE, DINO_SIZE, images,
                                    CONFIG["evaluate"]["analysis_timesteps"], SEED, CPU, tmp_path / "tsne.png")
        assert result["images"] == images == 48 and result["layer"] == "mid"
        return (float(np.mean([entry["cknna"] for entry in result["timesteps"]])),
                float(np.mean([entry["cknna_chance"] for entry in result["timesteps"]])))

    baseline_settings = train_settings(CONFIG, "smoke", "baseline")
    assert {k: v for k, v in baseline_settings.items() if k != "align_coeff"} == \
        {k: v for k, v in smoke_run["settings"].items() if k != "align_coeff"}
    _, baseline_dir = run_training(data, baseline_settings, tmp_path / "baseline")
    aligned, aligned_chance = held_out_cknna(smoke_run["model_dir"])
    plain, plain_chance = held_out_cknna(baseline_dir)
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


@pytest.mark.slow  # the smoke tier's 120-step run: minutes
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


@pytest.mark.slow  # the smoke tier's 120-step run: minutes
def test_exported_folder_loads_into_a_stock_pipeline_with_its_parameterisation(data, smoke_run, tmp_path):
    """The README's three lines give a stock StableDiffusionPipeline the run's EMA weights and the scheduler
    they were trained for; unguided, it then makes the very images our own sampler makes."""
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    from urepa.digests import directory_digest
    from urepa.export import load_finetuned_pipeline
    from urepa.sample import generate_samples, initial_noise

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
    ours = generate_samples(load_finetuned_pipeline(data["sd15"], ema, CPU), embeddings,
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
        _, model_dir = run_training(data, settings, tmp_path)
    assert "prediction 'v' with LoRA" in caplog.text and "epsilon model" in caplog.text
    for folder in (model_dir, model_dir / "ema", model_dir / "snapshots" / "step-0000002"):
        scheduler = DDIMScheduler.from_pretrained(str(folder), subfolder="scheduler")
        assert scheduler.config.prediction_type == "v_prediction", folder


def test_partial_finetune_exports_a_unet_that_differs_only_in_the_three_blocks(data, tmp_path):
    """model/ and ema/ hold whole U-Nets, as a stock pipeline loads them; the snapshot only the three blocks, which
    our loader puts into SD-1.5's U-Net: the final one is then ema/'s U-Net, tensor for tensor."""
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel

    from urepa.export import TRAINED_UNET, load_finetuned_pipeline

    settings = settings_for(finetune="partial", max_steps=3, checkpoint_every=3, eval_interval=3)
    _, model_dir = run_training(data, settings, tmp_path)
    assert not (model_dir / "pytorch_lora_weights.safetensors").exists()
    base, exported = load_unet(data["sd15"]).state_dict(), {}
    for folder in (model_dir / "unet", model_dir / "ema" / "unet"):
        stock = StableDiffusionPipeline.from_pretrained(
            str(data["sd15"]), unet=UNet2DConditionModel.from_pretrained(str(folder)), local_files_only=True)
        trained = exported[folder] = stock.unet.state_dict()
        assert trained.keys() == base.keys()
        changed = {name for name in base if not torch.equal(base[name], trained[name])}
        assert changed and all(name.startswith(tuple(b + "." for b in TRAINABLE_BLOCKS)) for name in changed)
        for block in TRAINABLE_BLOCKS:
            assert any(name.startswith(block + ".") for name in changed), f"{block} did not change"

    (snapshot,) = (model_dir / "snapshots").iterdir()
    assert not (snapshot / "unet").exists()
    assert all(name.startswith(tuple(b + "." for b in TRAINABLE_BLOCKS)) for name in load_file(snapshot / TRAINED_UNET))
    from_snapshot = load_finetuned_pipeline(data["sd15"], snapshot, CPU).unet.state_dict()
    assert_tensors_equal(from_snapshot, exported[model_dir / "ema" / "unet"], "final snapshot vs ema/unet")


# -- 5. baseline ------------------------------------------------------------------------------------


def test_baseline_builds_no_heads_or_hooks_and_logs_no_token_loss(data, tmp_path):
    settings = settings_for("baseline", max_steps=3, checkpoint_every=3, eval_interval=3)
    assert settings["align_coeff"] == 0
    trainer = make_trainer(data, settings, tmp_path / "inspect", report_to="tensorboard")
    model = trainer.accelerator.unwrap_model(trainer.model)
    assert len(model.heads) == 0 and model.capture is None
    assert not any(m._forward_hooks for m in model.modules())
    assert all(".lora_" in n for n, p in model.named_parameters() if p.requires_grad)
    # (the U-REPA run of the same tier does register its hook: the check above can fail)
    aligned = trainer.accelerator.unwrap_model(
        make_trainer(data, settings_for(), tmp_path / "aligned", report_to="tensorboard").model)
    assert len(aligned.heads) == 1 and any(m._forward_hooks for m in aligned.unet.modules())

    run_dir, model_dir = run_training(data, settings, tmp_path / "run")
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
        train_run({k: str(v) for k, v in data["caches"].items()}, str(data["sd15"]), str(other), str(data["vae_dir"]),
                  settings,
                  run_dir, tmp_path / "run" / "model", SEED, CPU, 0, "test", **VIEW)
    assert not run_dir.exists()


def test_a_latent_cache_of_another_vae_is_refused_before_training_naming_both(data, smoke_inputs, tmp_path):
    """The shared latent cache was encoded by SD-1.5's VAE; a run on VAE `e2e` (its `train.vae`) must not train on
    it: the message names the cache's VAE and the run's."""
    settings = settings_for(max_steps=2, vae="e2e")
    run_dir = tmp_path / "run" / "train_state"
    with pytest.raises(VaeMismatchError, match=r"latent cache .*vae_latents.zarr: made with VAE 'sd15' \(.*\) but "
                                               r"given VAE 'e2e' \(.*e2e_vae"):
        train_run({k: str(v) for k, v in data["caches"].items()}, str(data["sd15"]), str(data["dinov2"]),
                  str(smoke_inputs["e2e_vae"]), settings, run_dir, tmp_path / "run" / "model", SEED, CPU, 0, "test",
                  **VIEW)
    assert not run_dir.exists()


def test_dino_cache_of_another_view_is_refused_before_training(data, tmp_path):
    """A token cache of another DINOv2 view (here: the VAE's square seen at 2x the size) is not reused."""
    settings = settings_for(max_steps=2)
    run_dir = tmp_path / "run" / "train_state"
    with pytest.raises(CacheMismatchError, match="view"):
        train_run({k: str(v) for k, v in data["caches"].items()}, str(data["sd15"]), str(data["dinov2"]),
                  str(data["vae_dir"]), settings, run_dir, tmp_path / "run" / "model", SEED, CPU, 0, "test",
                  image_size=SMOKE_IMAGE_SIZE, dino_size=2 * DINO_SIZE)
    assert not run_dir.exists()


# -- 7. invalid rows, rebuilt caches, run states ---------------------------------------------------


@pytest.mark.parametrize("invalid_in", ["vae", "dino"])
def test_training_skips_rows_marked_invalid(data, tmp_path, caplog, invalid_in):
    """A row either encoder failed on (marked invalid in its cache, NaN data) is never trained on."""
    # The row the first batch would hold if invalid rows were not skipped.
    num_rows = len(data["table"])
    skipped = int(take_batches(StepBatches(np.arange(num_rows), BATCH, SEED), 1)[0][0])
    path = tmp_path / Path(data["caches"][invalid_in]).name
    cache = copy_cache(data["caches"][invalid_in], path)
    cache["mean" if invalid_in == "vae" else "tokens"][skipped] = np.nan
    cache["valid"][skipped] = False
    caches = {**data["caches"], invalid_in: path}
    settings = settings_for(max_steps=2, checkpoint_every=2, eval_interval=2)
    with caplog.at_level(logging.WARNING, logger="urepa.train"):
        run_dir, model_dir = run_training(data, settings, tmp_path / "run", caches)
    assert f"skipping 1 invalid cached rows of {num_rows}" in caplog.text
    assert np.isfinite(read_log(run_dir)["loss"]).all()
    assert json.loads((model_dir / "config.json").read_text())["trained_rows"] == num_rows - 1
    if invalid_in == "dino":
        return
    # and the trainer's own data loader never hands the row out, over several epochs
    trainer = make_trainer(data, settings, tmp_path / "inspect", path, report_to="tensorboard")
    seen = np.concatenate([batch["row"].numpy() for batch in itertools.islice(iter(trainer.batches(0)), 20)])
    assert skipped not in seen and len(np.unique(seen)) == num_rows - 1


def test_a_rebuilt_cache_retrains_instead_of_re_exporting_the_finished_state(data, tmp_path, caplog):
    """Same settings, CSV, encoders and code, but the cache was rebuilt and one image is now invalid: the
    finished state belongs to other data, so the run trains anew on the new rows, beside it."""
    settings = settings_for(max_steps=2, checkpoint_every=2, eval_interval=2)
    vae_path = tmp_path / "vae_latents.zarr"
    copy_cache(data["caches"]["vae"], vae_path)
    caches = {**data["caches"], "vae": vae_path}
    run_dir, model_dir = run_training(data, settings, tmp_path / "run", caches)
    first = load_file(model_dir / "ema" / "pytorch_lora_weights.safetensors")
    vae = zarr.open_group(str(vae_path), mode="r+")
    vae["valid"][0] = False
    vae.attrs["errors"] = [{"row": 0, "error": "OSError: image file is truncated"}]
    with caplog.at_level(logging.INFO, logger="urepa.runstate"):
        second_run_dir, _ = run_training(data, settings, tmp_path / "run", caches)
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
                        str(data["vae_dir"]), settings, tmp_path / "train_state", tmp_path / "model", SEED, CPU, 0, "test", **VIEW,
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
    first_dir, model_dir = run_training(data, settings, tmp_path)
    first = load_file(model_dir / "ema" / "pytorch_lora_weights.safetensors")
    other_dir, _ = run_training(data, {**settings, "align_coeff": 0.5}, tmp_path)
    assert other_dir != first_dir and json.loads((other_dir / "run.json").read_text())["settings"]["align_coeff"] == 0.5
    finished = (first_dir / "checkpoints" / "checkpoint-2" / "model.safetensors").stat().st_mtime_ns
    with caplog.at_level(logging.INFO, logger="urepa.runstate"):
        reverted_dir, _ = run_training(data, settings, tmp_path)
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
        run_training(data, settings_for(max_steps=2), tmp_path / "run", {**data["caches"], "clip": clip_path})
    assert not list((tmp_path / "run").glob("train_state/*"))


# -- the wiring of a step, pinned against values computed here from what the step itself drew ----------


class ForwardSpy:
    """Every forward of the trainer's model: its inputs and outputs, detached."""

    def __init__(self, trainer: Trainer):
        self.calls: list[dict] = []
        trainer.accelerator.unwrap_model(trainer.model).register_forward_hook(self._record, with_kwargs=True)

    def _record(self, module, args, kwargs, output):
        names = ("sample", "timesteps", "encoder_hidden_states")
        inputs = {**dict(zip(names, args)), **kwargs}
        prediction, tokens = output
        self.calls.append({**{k: v.detach().clone() for k, v in inputs.items()},
                           "prediction": prediction.detach().clone(),
                           "tokens": {k: v.detach().clone() for k, v in tokens.items()}})


def alphas_cumprod(scheduler) -> np.ndarray:
    """SD-1.5's DDPM schedule from its config, by hand: scaled-linear betas, cumulative product of 1 - beta."""
    config = scheduler.config
    assert config.beta_schedule == "scaled_linear"
    betas = np.linspace(config.beta_start ** 0.5, config.beta_end ** 0.5, config.num_train_timesteps) ** 2
    return np.cumprod(1 - betas)


# -- 8. the objective as trained ------------------------------------------------------------------------


@pytest.mark.parametrize("prediction, snr_gamma", [("epsilon", None), ("v", None), ("epsilon", 5.0), ("v", 5.0)])
def test_loss_diff_is_the_mse_to_the_configured_target_from_the_steps_own_draws(data, tmp_path, prediction,
                                                                                 snr_gamma):
    """With a zero posterior std the latents are known (mean x scaling factor); the noise then follows from
    the U-Net's input and timesteps, and the target and loss are recomputed from it."""
    trainer = make_trainer(data, settings_for(steps=8, prediction=prediction, snr_gamma=snr_gamma), tmp_path)
    spy = ForwardSpy(trainer)
    batch = batch_of(trainer, data)
    batch["latent_std"] = torch.zeros_like(batch["latent_std"])
    logged = trainer.step(batch)

    (call,) = spy.calls
    t = call["timesteps"].numpy()
    abar = alphas_cumprod(trainer.noise_scheduler)[t].reshape(-1, 1, 1, 1)
    x0 = batch["latent_mean"].double().numpy() * data["normalisation"].scaling_factor
    noisy = call["sample"].double().numpy()
    noise = (noisy - np.sqrt(abar) * x0) / np.sqrt(1 - abar)
    # What was recovered is the step's standard-normal noise (a wrong x0 would not look like it).
    assert abs(noise.mean()) < 0.1 and abs(noise.std() - 1) < 0.1
    target = noise if prediction == "epsilon" else np.sqrt(abar) * noise - np.sqrt(1 - abar) * x0
    per_image = ((call["prediction"].double().numpy() - target) ** 2).mean(axis=(1, 2, 3))
    if snr_gamma is None:
        expected = per_image.mean()
    else:  # min-SNR-gamma (Hang et al. 2023): min(snr, gamma) / snr for epsilon, / (snr + 1) for v
        snr = (abar / (1 - abar)).ravel()
        weights = np.minimum(snr, snr_gamma) / (snr if prediction == "epsilon" else snr + 1)
        expected = (weights * per_image).mean()
    assert logged["loss_diff"] == pytest.approx(expected, rel=1e-4)
    # the timesteps cover the schedule's range, one per image
    assert t.shape == (BATCH,) and ((0 <= t) & (t < 1000)).all()


@pytest.mark.parametrize("vae_config", [None, {"scaling_factor": 0.5, "latents_mean": [0.1, -0.2, 0.3, 0.05],
                                                "latents_std": [0.9, 1.3, 0.7, 1.1]}], ids=["sd15", "per-channel"])
def test_latents_are_a_fresh_posterior_sample_times_the_scaling_factor_at_every_step(data, tmp_path, vae_config):
    """A schedule without noise (all betas 0) hands the U-Net x0 itself: (mean + std * z) * scaling factor,
    with z standard normal and drawn anew at every step; for a VAE whose config has per-channel latents_mean /
    latents_std, ((mean + std * z) - latents_mean) / latents_std * scaling factor."""
    from diffusers import DDPMScheduler

    sd = load_noise_scheduler(data["sd15"])
    noiseless = DDPMScheduler.from_config(sd.config, trained_betas=[0.0] * sd.config.num_train_timesteps)
    norm = LatentNormalisation.from_config(vae_config) if vae_config else data["normalisation"]
    trainer = make_trainer(data, settings_for(steps=8), tmp_path, noise_scheduler=noiseless, normalisation=norm)
    channel_mean, channel_std = 0.0, 1.0
    if vae_config:
        channel_mean = np.asarray(vae_config["latents_mean"]).reshape(1, 4, 1, 1)
        channel_std = np.asarray(vae_config["latents_std"]).reshape(1, 4, 1, 1)
    spy = ForwardSpy(trainer)
    batch = batch_of(trainer, data)
    # Means far from 0 and a std unlike 1 and unlike the scaling factor: a missing factor, the mean alone
    # or the variance for the std each give a z that is not standard normal.
    mean = 2.0 + torch.arange(batch["latent_mean"].numel()).reshape(batch["latent_mean"].shape) % 3.0
    batch["latent_mean"], batch["latent_std"] = mean, torch.full_like(mean, 0.4)
    trainer.step(batch)
    trainer.step(batch)
    draws = []
    for call in spy.calls:
        latents = call["sample"].double().numpy() / norm.scaling_factor * channel_std + channel_mean
        z = (latents - mean.double().numpy()) / 0.4
        assert abs(z.mean()) < 0.1 and abs(z.std() - 1) < 0.1
        # one draw per image and channel: not one shared by the batch (a draw of the wrong shape broadcasts)
        assert all(abs(np.corrcoef(z[0].ravel(), z[b].ravel())[0, 1]) < 0.5 for b in range(1, len(z)))
        assert abs(np.corrcoef(z[0, 0].ravel(), z[0, 1].ravel())[0, 1]) < 0.5
        draws.append(z.ravel())
    assert abs(np.corrcoef(draws[0], draws[1])[0, 1]) < 0.1  # a new sample, not the last step's again


def hand_alignment_terms(tokens: dict[str, torch.Tensor], target: torch.Tensor, mode: str, upper_only: bool,
                         mask_diag: bool) -> tuple[float, float]:
    """(L_token, L_manifold) by hand in float64, averaged over the aligned layers."""
    target = target.double().numpy()
    token_terms, manifold_terms = [], []
    for pred in tokens.values():
        pred = pred.double().numpy()
        cosine = (pred * target).sum(-1) / (np.linalg.norm(pred, axis=-1) * np.linalg.norm(target, axis=-1))
        token_terms.append((1 - cosine).mean())

        def grams(x):
            if mode == "sample":
                pooled = x.mean(axis=1)
                pooled /= np.linalg.norm(pooled, axis=-1, keepdims=True)
                return pooled @ pooled.T
            unit = x / np.linalg.norm(x, axis=-1, keepdims=True)
            return unit @ unit.transpose(0, 2, 1)

        squared = (grams(pred) - grams(target)) ** 2
        n = squared.shape[-1]
        keep = np.triu(np.ones((n, n), bool)) if upper_only else np.ones((n, n), bool)
        if mask_diag:
            keep &= ~np.eye(n, dtype=bool)
        manifold_terms.append(squared[..., keep].mean())
    return float(np.mean(token_terms)), float(np.mean(manifold_terms))


def lambda_by_hand(step: int, coeff: float, warmup: int, decay: int, end: float, cutoff: int | None) -> float:
    """The linear-decay schedule of these tests, written out: warm-up to coeff, linear to end, 0 from cutoff."""
    if cutoff is not None and step >= cutoff:
        return 0.0
    if step < warmup:
        return coeff * (step + 1) / warmup
    return coeff + (end - coeff) * min(1.0, (step - warmup) / decay)


@pytest.mark.parametrize("layers, mode, upper_only, mask_diag, coeff, manifold_coeff", [
    (["mid"], "sample", False, False, 0.8, 3.0),
    (["mid", "enc_last"], "token", True, True, 0.5, 2.0),
    (["mid"], "token", True, False, 0.5, 2.0),  # upper triangle with its diagonal: unlike the full Gram's mean
])
def test_every_logged_row_is_loss_diff_plus_lambda_times_token_plus_w_manifold(data, tmp_path, layers, mode,
                                                                            upper_only, mask_diag, coeff,
                                                                            manifold_coeff):
    schedule = {"kind": "linear", "warmup_steps": 2, "decay_steps": 2, "end": 0.2, "cutoff_step": 5}
    steps = 6
    settings = settings_for(steps=8, align_layers=layers, manifold_mode=mode, manifold_upper_only=upper_only,
                            manifold_mask_diag=mask_diag, align_coeff=coeff, manifold_coeff=manifold_coeff,
                            align_schedule=schedule, max_steps=steps, checkpoint_every=steps, eval_interval=steps)
    trainer = make_trainer(data, settings, tmp_path)
    spy = ForwardSpy(trainer)
    batches = []
    step = trainer.step

    def recording_step(batch):
        batches.append(batch)
        return step(batch)

    trainer.step = recording_step
    trainer.run()
    log = pd.read_csv(tmp_path / "train_log.csv")
    assert log["step"].tolist() == list(range(1, steps + 1)) and len(spy.calls) == len(batches) == steps
    for row, call, batch in zip(log.itertuples(), spy.calls, batches):
        lam = lambda_by_hand(row.step - 1, coeff, 2, 2, 0.2, 5)
        token, manifold = hand_alignment_terms(call["tokens"], batch["tokens"], mode, upper_only, mask_diag)
        assert set(call["tokens"]) == set(layers)
        assert row.align_coeff == pytest.approx(lam, abs=1e-12)
        assert row.loss_token == pytest.approx(token, rel=1e-5)
        assert row.loss_manifold == pytest.approx(manifold, rel=1e-4, abs=1e-7)
        assert row.loss == pytest.approx(row.loss_diff + lam * (token + manifold_coeff * manifold), rel=1e-5)
    # the schedule went through warm-up, decay and cut-off, so a lambda that ignored it would fail above
    assert sorted(set(log["align_coeff"].round(6))) == pytest.approx([0.0, 0.2, coeff / 2, (coeff + 0.2) / 2, coeff])


# -- 9. condition dropout -------------------------------------------------------------------------------


def conditions(data, trainer: Trainer, steps: int) -> tuple[np.ndarray, list]:
    """Per step and image: True where the U-Net got the null prompt, False where its class's prompt;
    anything else fails."""
    spy = ForwardSpy(trainer)
    class_ids = []
    for step in range(steps):
        batch = batch_of(trainer, data, first=(step * BATCH) % (len(data["rows"]) - BATCH))
        class_ids.append(batch["class_id"].numpy())
        trainer.step(batch)
    clip = torch.from_numpy(data["clip"]).float()
    null = clip[-1]
    dropped = np.zeros((steps, BATCH), bool)
    for s, (call, ids) in enumerate(zip(spy.calls, class_ids)):
        for i, hidden in enumerate(call["encoder_hidden_states"]):
            is_null, is_class = torch.equal(hidden, null), torch.equal(hidden, clip[ids[i]])
            assert is_null != is_class, f"step {s}, image {i}: neither its class's prompt nor the null prompt"
            dropped[s, i] = is_null
    return dropped, class_ids


def test_the_null_prompt_is_the_clip_caches_last_row(data):
    assert data["null_index"] == len(data["clip"]) - 1
    assert len(set(data["table"]["class_id"])) == len(data["clip"]) - 1


@pytest.mark.parametrize("rate", [0.0, 1.0])
def test_condition_dropout_at_zero_and_one(data, tmp_path, rate):
    dropped, _ = conditions(data, make_trainer(data, settings_for(steps=8, cond_dropout=rate), tmp_path), 3)
    assert (dropped == bool(rate)).all()


def test_condition_dropout_at_one_half_is_per_image(data, tmp_path):
    steps = 30
    dropped, _ = conditions(data, make_trainer(data, settings_for(steps=8, cond_dropout=0.5), tmp_path), steps)
    # 120 Bernoulli(1/2) draws: 60 +- 5.5; the bounds are 4 sigma.
    assert 38 <= dropped.sum() <= 82, dropped.sum()
    mixed = [s for s in range(steps) if 0 < dropped[s].sum() < BATCH]
    assert len(mixed) >= steps // 2, "dropout is drawn per batch, not per image"
    # every position of the batch is dropped sometimes and kept sometimes, in no fixed pattern
    assert all(5 <= n <= steps - 5 for n in dropped.sum(axis=0)), dropped.sum(axis=0)
    assert len({tuple(row) for row in dropped}) > steps // 3


# -- 10. gradient accumulation, draws, learning rate -------------------------------------------------------


def first_step_gradients(data, settings: dict, run_dir: Path) -> tuple[dict, list[torch.Tensor]]:
    """The logged values of a trainer's first step and the gradients the optimiser stepped with."""
    trainer = make_trainer(data, settings, run_dir)
    grads, optimizer_step = [], trainer.optimizer.step

    def spying_step(*args, **kwargs):
        grads.extend(p.grad.detach().clone() for p in trainer.trainable)
        return optimizer_step(*args, **kwargs)

    trainer.optimizer.step = spying_step
    return trainer.step(batch_of(trainer, data)), grads


@pytest.mark.parametrize("mode, align_coeff", [("sample", 0.7), ("token", 0.7), ("sample", 0.0)])
def test_accumulated_micro_batches_step_with_the_whole_batchs_losses_and_gradient(data, tmp_path, mode,
                                                                                  align_coeff):
    """grad_accum = 2 splits the step's batch in two: the same draws, the same logged terms, and the gradient
    of the whole batch's loss (with the sample Gram over the whole batch, from the no-grad pre-pass). The
    baseline (align_coeff 0) logs no alignment terms (NaN)."""
    settings = settings_for(steps=8, manifold_mode=mode, manifold_coeff=3.0, align_coeff=align_coeff)
    whole, whole_grads = first_step_gradients(data, {**settings, "grad_accum": 1}, tmp_path / "whole")
    accumulated, accumulated_grads = first_step_gradients(data, {**settings, "grad_accum": 2}, tmp_path / "accum")
    aligned = align_coeff > 0
    for term in ("loss", "loss_diff", "loss_token", "loss_manifold", "align_coeff", "grad_norm"):
        if not aligned and term in ("loss_token", "loss_manifold"):
            assert np.isnan(whole[term]) and np.isnan(accumulated[term]), term
        else:
            assert accumulated[term] == pytest.approx(whole[term], rel=1e-5), term
    if not aligned:
        assert whole["loss"] == whole["loss_diff"]
    assert len(accumulated_grads) == len(whole_grads) and any(g.abs().sum() > 0 for g in whole_grads)
    for a, b in zip(accumulated_grads, whole_grads):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5 * float(b.abs().max()) + 1e-12)


def test_the_objective_is_summed_in_one_place_for_the_plain_and_the_accumulated_step(data, tmp_path, monkeypatch):
    """`losses.Objective` is the only place the terms become the loss: a change planted there (lambda counted
    twice) changes the plain step and the accumulated one (whose manifold term is the pre-pass's global Gram)
    alike, in the logged loss and in the gradient."""
    settings = settings_for(steps=8, manifold_mode="sample", manifold_coeff=3.0, align_coeff=0.7)
    before = {accumulate: first_step_gradients(data, {**settings, "grad_accum": accumulate}, tmp_path / f"{accumulate}")
              for accumulate in (1, 2)}
    original = losses.Objective.__call__

    def planted(self, model_pred, target, timesteps, pred_tokens, target_tokens, align_coeff, accumulate=1,
                gather=None):
        return original(self, model_pred, target, timesteps, pred_tokens, target_tokens, 2 * align_coeff, accumulate,
                        gather)

    monkeypatch.setattr(losses.Objective, "__call__", planted)
    for accumulate, (unplanted, unplanted_grads) in before.items():
        values, grads = first_step_gradients(data, {**settings, "grad_accum": accumulate},
                                             tmp_path / f"planted-{accumulate}")
        assert values["loss_diff"] == unplanted["loss_diff"], accumulate
        expected = unplanted["loss_diff"] + 2 * 0.7 * (unplanted["loss_token"] + 3.0 * unplanted["loss_manifold"])
        assert values["loss"] == pytest.approx(expected, rel=1e-5), accumulate
        assert values["loss"] != pytest.approx(unplanted["loss"], rel=1e-3), accumulate
        assert any(not torch.allclose(a, b, rtol=1e-3, atol=0) for a, b in zip(grads, unplanted_grads)), accumulate


def test_every_random_draw_of_a_step_comes_from_the_checkpointed_generator(data, tmp_path):
    """Resume and several processes rely on it: replaying the generator's state replays the step's posterior
    sample, noise, timesteps and dropout exactly, whatever torch's global generator does meanwhile."""
    trainer = make_trainer(data, settings_for(steps=8, cond_dropout=0.5), tmp_path)
    shape = batch_of(trainer, data)["latent_mean"].shape[1:]
    state = trainer.generator.get_state()
    torch.manual_seed(123)
    first = trainer.draw(shape)
    trainer.generator.set_state(state)
    torch.manual_seed(456)
    again = trainer.draw(shape)
    assert set(first) == {"posterior", "noise", "timesteps", "dropped"}
    for key in first:
        assert torch.equal(first[key], again[key]), key
    assert not torch.equal(trainer.draw(shape)["noise"], first["noise"])  # and the generator moves on


def test_timesteps_are_uniform_over_the_whole_schedule_including_zero(data, tmp_path):
    """t ~ U{0, ..., T-1} per image: on a 4-step schedule every step, 0 and T-1 included, comes up about
    equally often (an off-by-one in the range would never draw one end)."""
    from diffusers import DDPMScheduler

    short = DDPMScheduler.from_config(load_noise_scheduler(data["sd15"]).config, num_train_timesteps=4)
    trainer = make_trainer(data, settings_for(steps=8), tmp_path, noise_scheduler=short)
    shape = batch_of(trainer, data)["latent_mean"].shape[1:]
    drawn = torch.cat([trainer.draw(shape)["timesteps"] for _ in range(100)]).numpy()
    counts = np.bincount(drawn, minlength=5)
    # 400 draws: 100 +- 8.7 per step; the bounds are 4 sigma
    assert counts[4] == 0 and all(65 <= n <= 135 for n in counts[:4]), counts


def test_the_learning_rate_warms_up_linearly_then_decays_on_a_cosine_and_is_logged(data, tmp_path):
    """diffusers' cosine schedule with warm-up, in optimiser steps: after step n, lr = base * n / W for n < W
    and base * (1 + cos(pi * (n - W) / (T - W))) / 2 after (W = warmup_ratio * T). The step logs the rate the
    next step will use, which is the optimiser's."""
    settings = settings_for(steps=8, max_steps=8, warmup_ratio=0.25, learning_rate=1e-3)
    trainer = make_trainer(data, settings, tmp_path)
    base, warmup, total = 1e-3, 2, 8
    for n in range(1, total + 1):
        logged = trainer.step(batch_of(trainer, data))
        expected = base * n / warmup if n < warmup else \
            base * (1 + math.cos(math.pi * (n - warmup) / (total - warmup))) / 2
        assert logged["lr"] == pytest.approx(expected, abs=1e-12), n
        assert trainer.optimizer.param_groups[0]["lr"] == pytest.approx(expected, abs=1e-12), n


def test_a_nan_loss_before_any_checkpoint_says_there_is_none(data, tmp_path):
    trainer = make_trainer(data, settings_for(steps=8), tmp_path)
    batch = batch_of(trainer, data)
    batch["latent_mean"][0] = float("nan")
    with pytest.raises(FloatingPointError) as error:
        trainer.step(batch)
    message = str(error.value)
    assert message.startswith("non-finite loss at step 1: ")
    assert "the last good checkpoint is none (no checkpoint yet)." in message
    assert trainer.state.step == 0  # the bad step is not counted


# -- 11. the run loop: log, snapshots, checkpoints, resume -------------------------------------------------


class Killed(Exception):
    """Stands for a kill: raised from a snapshot, after the step's log row and before its checkpoint."""


def run_trainer(data, settings: dict, run_dir: Path, kill_at: int | None = None) -> tuple[Trainer, list[int]]:
    run_dir.mkdir(parents=True, exist_ok=True)  # train_run's claim of the run state makes it
    trainer, snapshots = make_trainer(data, settings, run_dir), []

    def on_snapshot(trainer: Trainer, step: int) -> None:
        snapshots.append(step)
        if step == kill_at:
            raise Killed

    try:
        trainer.run(on_snapshot)
    except Killed:
        pass
    return trainer, snapshots


def test_a_run_logs_every_step_snapshots_at_eval_interval_and_keeps_its_last_checkpoints(data, tmp_path):
    settings = settings_for(steps=8, max_steps=6, eval_interval=4, checkpoint_every=2, checkpoints_total_limit=2)
    trainer, snapshots = run_trainer(data, settings, tmp_path)
    assert snapshots == [4, 6]  # every eval_interval steps, and the last step
    assert [p.name for p in trainer.checkpoints()] == ["checkpoint-4", "checkpoint-6"]
    assert not list((tmp_path / "checkpoints").glob("*.tmp"))
    log = pd.read_csv(tmp_path / "train_log.csv")
    assert list(log.columns) == ["step", "loss", "loss_diff", "loss_token", "loss_manifold", "align_coeff", "lr",
                                 "grad_norm", "step_time"]
    assert log["step"].tolist() == [1, 2, 3, 4, 5, 6]
    assert np.isfinite(log.drop(columns="step").to_numpy()).all() and (log["step_time"] > 0).all()


@pytest.mark.parametrize("finetune", ["lora", "partial", "full"])
def test_a_killed_run_resumes_from_its_last_checkpoint_and_ends_as_an_uninterrupted_one(data, tmp_path, finetune):
    """Killed after step 5's log row (checkpoint-4 the newest), a new trainer on the same folder resumes at
    step 4, drops the logged row 5, redoes steps 5 and 6 and ends with the uninterrupted run's log, weights,
    EMA and generator, though its checkpoints hold the trained tensors only (the rest is SD-1.5's U-Net, loaded
    again). A leftover half checkpoint (*.tmp) is cleared before it is written into."""
    settings = settings_for(steps=8, max_steps=6, eval_interval=1, checkpoint_every=2, checkpoints_total_limit=10,
                            finetune=finetune)
    whole, _ = run_trainer(data, settings, tmp_path / "whole")

    run_dir = tmp_path / "killed"
    (run_dir / "checkpoints" / "checkpoint-2.tmp").mkdir(parents=True)
    (run_dir / "checkpoints" / "checkpoint-2.tmp" / "leftover").write_text("from a killed save")
    killed, snapshots = run_trainer(data, settings, run_dir, kill_at=5)
    assert snapshots == [1, 2, 3, 4, 5] and killed.state.step == 5
    assert [p.name for p in killed.checkpoints()] == ["checkpoint-2", "checkpoint-4"]
    assert not (run_dir / "checkpoints" / "checkpoint-2" / "leftover").exists()
    assert pd.read_csv(run_dir / "train_log.csv")["step"].tolist() == [1, 2, 3, 4, 5]

    resumed, snapshots = run_trainer(data, settings, run_dir)
    assert snapshots == [5, 6]
    assert [p.name for p in resumed.checkpoints()] == ["checkpoint-2", "checkpoint-4", "checkpoint-6"]
    logged = {name: pd.read_csv(folder / "train_log.csv").drop(columns="step_time")
              for name, folder in (("whole", tmp_path / "whole"), ("resumed", run_dir))}
    assert logged["resumed"]["step"].tolist() == [1, 2, 3, 4, 5, 6]  # one header, row 5 once
    pd.testing.assert_frame_equal(logged["resumed"], logged["whole"], rtol=0, atol=0)
    for a, b in zip(resumed.trainable, whole.trainable):
        assert torch.equal(a, b)
    for a, b in zip(resumed.ema.shadow_params, whole.ema.shadow_params):
        assert torch.equal(a, b)
    assert resumed.ema.optimization_step == whole.ema.optimization_step == 6
    assert torch.equal(resumed.generator.get_state(), whole.generator.get_state())
    model = resumed.accelerator.unwrap_model(resumed.model)
    for name, tensor in whole.accelerator.unwrap_model(whole.model).state_dict().items():
        assert torch.equal(model.state_dict()[name], tensor), name
    saved = load_file(run_dir / "checkpoints" / "checkpoint-6" / "model.safetensors")
    trained = {name for name, p in model.named_parameters() if p.requires_grad}
    assert saved.keys() == trained
    if finetune != "full":  # the frozen weights are not in it
        assert len(trained) < len(model.state_dict())


# -- 12. what the trainer is built with -------------------------------------------------------------------


def test_the_ema_averages_the_trained_weights_with_the_configured_decay(data, tmp_path):
    """diffusers' EMA with its warm-up: the first update copies the weights, the second mixes with decay
    min((1 + 1) / (10 + 1), ema_decay) = ema_decay for ema_decay = 0.1."""
    trainer = make_trainer(data, settings_for(steps=8, ema_decay=0.1), tmp_path)
    weights = []
    for _ in range(2):
        trainer.step(batch_of(trainer, data))
        weights.append([p.detach().clone() for p in trainer.trainable])
    assert len(trainer.ema.shadow_params) == len(trainer.trainable)
    for shadow, first, second in zip(trainer.ema.shadow_params, *weights):
        torch.testing.assert_close(shadow, 0.1 * first + 0.9 * second, rtol=1e-5, atol=1e-7)
    assert any(not torch.equal(a, b) for a, b in zip(*weights))


@pytest.mark.parametrize("enabled", [True, False])
def test_gradient_checkpointing_is_set_on_the_unet_as_configured(data, tmp_path, enabled):
    trainer = make_trainer(data, settings_for(steps=8, gradient_checkpointing=enabled), tmp_path)
    assert trainer.accelerator.unwrap_model(trainer.model).unet.is_gradient_checkpointing is enabled


@pytest.mark.parametrize("prediction, finetune, warned", [("v", "lora", True), ("v", "partial", False),
                                                          ("epsilon", "lora", False)])
def test_v_prediction_with_lora_is_warned_about(data, tmp_path, caplog, prediction, finetune, warned):
    with caplog.at_level("WARNING", logger="urepa.train"):
        make_trainer(data, settings_for(steps=8, prediction=prediction, finetune=finetune), tmp_path)
    assert ("prediction 'v' with LoRA: SD-1.5 is an epsilon model" in caplog.text) is warned
    if warned:
        assert "use prediction: epsilon" in caplog.text


def test_data_workers_load_the_same_batches_in_the_same_order(data, tmp_path):
    """num_workers reading processes, kept for the whole run, hand out the batches StepBatches orders, as the
    main process alone would."""
    loaders = {workers: make_trainer(data, settings_for(steps=8), tmp_path / str(workers), num_workers=workers).batches(3)
               for workers in (0, 2)}
    assert loaders[2].num_workers == 2 and loaders[2].persistent_workers
    assert loaders[0].num_workers == 0 and not loaders[0].pin_memory  # pinned memory only for a GPU
    batches = {workers: list(itertools.islice(iter(loader), 4)) for workers, loader in loaders.items()}
    for alone, read in zip(batches[0], batches[2]):
        assert alone.keys() == read.keys()
        for key in alone:
            assert torch.equal(alone[key], read[key]), key


@pytest.mark.parametrize("enabled", [True, False])
def test_phase_timing_charges_every_phase_of_a_step_when_enabled(data, tmp_path, enabled):
    """benchmarks/train_step.py's split of a step: forward (inside the model), alignment, backward, optimizer
    and EMA each get their wall time; nothing is timed when disabled."""
    trainer = make_trainer(data, settings_for(steps=8), tmp_path, time_phases=enabled)
    trainer.step(batch_of(trainer, data))
    totals = trainer.timer.totals
    if enabled:
        assert set(totals) == {"forward", "alignment", "backward", "optimizer", "ema"}
        assert all(seconds > 0 for seconds in totals.values())
    else:
        assert not totals


# -- 11. speed options ----------------------------------------------------------------------------------------------


def steps_with(data, settings: dict, run_dir: Path, steps: int) -> tuple[list[dict], list[list[torch.Tensor]], list]:
    """The logged values of a trainer's first `steps` steps, its trainable weights before and after each, and the
    gradients its first optimiser step stepped with."""
    trainer = make_trainer(data, settings, run_dir)
    grads, optimizer_step = [], trainer.optimizer.step

    def spying_step(*args, **kwargs):
        if not grads:
            grads.extend(p.grad.detach().clone() for p in trainer.trainable)
        return optimizer_step(*args, **kwargs)

    trainer.optimizer.step = spying_step
    weights = [[p.detach().clone() for p in trainer.trainable]]
    values = []
    for step in range(steps):
        values.append(trainer.step(batch_of(trainer, data, first=step * BATCH)))
        weights.append([p.detach().clone() for p in trainer.trainable])
    return values, weights, grads


SPEED_OFF = {"tf32": False, "fused_adamw": False, "compile": False, "channels_last": False, "pin_memory": False}


# compile with LoRA only: the compiled graph is the U-Net's with its hook either way, and inductor compiling the
# partial case's backward takes minutes on a CPU for no path LoRA's does not take
@pytest.mark.parametrize("option, finetune", [("fused_adamw", "lora"), ("fused_adamw", "partial"),
                                              ("channels_last", "lora"), ("channels_last", "partial"),
                                              pytest.param("compile", "lora", marks=pytest.mark.slow)])
def test_a_speed_option_leaves_losses_and_weights_within_float_noise(data, tmp_path, option, finetune):
    """Three U-REPA steps with the option on log what they log with it off, every term within 1e-5 relative. The
    model options (channels_last, compile) change the arithmetic of the forward and backward: the first step's
    gradients agree within 1e-4 relative (1e-5 of the largest). fused_adamw changes the update's: from the same
    gradients, the first update is within 1e-4 of the largest. Updates after a changed gradient are not compared
    weight by weight: Adam's first steps move a weight by ~lr x g / (|g| + eps), so a weight whose gradient is near
    eps moves by a different share of lr on float noise alone (measured with channels_last: 2.5e-1 of lr)."""
    settings = settings_for(steps=8, finetune=finetune, **SPEED_OFF)
    off_values, off_weights, off_grads = steps_with(data, settings, tmp_path / "off", 3)
    on_values, on_weights, on_grads = steps_with(data, {**settings, option: True}, tmp_path / "on", 3)
    for step, (off, on) in enumerate(zip(off_values, on_values)):
        for term in LOSS_TERMS:
            assert on[term] == pytest.approx(off[term], rel=1e-5), (step, term)
    assert all(torch.equal(a, b) for a, b in zip(on_weights[0], off_weights[0]))
    assert len(on_grads) == len(off_grads) and any(g.abs().sum() > 0 for g in off_grads)
    for a, b in zip(on_grads, off_grads):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5 * float(b.abs().max()) + 1e-12)
    if option == "fused_adamw":
        off_update = [after - before for after, before in zip(off_weights[1], off_weights[0])]
        on_update = [after - before for after, before in zip(on_weights[1], on_weights[0])]
        largest = max(float(u.abs().max()) for u in off_update)
        worst = max(float((a - b).abs().max()) for a, b in zip(on_update, off_update))
        assert largest > 0 and worst <= 1e-4 * largest, (worst, largest)


def test_the_cuda_only_speed_options_change_nothing_on_the_cpu_and_say_so(data, tmp_path, caplog):
    """tf32 and pin_memory on the CPU: the same steps bit for bit, and a log line naming each as CUDA only."""
    settings = settings_for(steps=8, **SPEED_OFF)
    off_values, off_weights, _ = steps_with(data, settings, tmp_path / "off", 2)
    with caplog.at_level(logging.INFO):
        on_values, on_weights, _ = steps_with(data, {**settings, "tf32": True, "pin_memory": True}, tmp_path / "on", 2)
    assert on_values == off_values
    assert all(torch.equal(a, b) for a, b in zip(on_weights[-1], off_weights[-1]))
    assert "tf32: CUDA only, no effect on cpu" in caplog.text
    assert "pin_memory: CUDA only, no effect on cpu" in caplog.text
