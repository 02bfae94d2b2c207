"""The wiring of `Trainer.step`, pinned against values computed here from what the step itself drew.

A step is observed from outside: a forward hook on the trained model records its inputs (noisy latents,
timesteps, text conditions) and outputs (prediction, aligned tokens); the batch is one this test built.
From those, the expected diffusion target, losses and conditions are recomputed by hand (numpy, SD-1.5's
schedule from its betas), so a step that draws, routes or weights something wrongly fails here even when
the loss still goes down.
"""
from __future__ import annotations

import itertools
import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import zarr

from conftest import CPU, unet_prediction
from urepa.caches import CachedRows, valid_rows
from urepa.config import load_yaml, train_settings
from urepa.sd15 import load_noise_scheduler, load_unet
from urepa.train import Trainer, complete_checkpoints

REPO = Path(__file__).resolve().parents[1]
CONFIG = load_yaml(REPO / "config" / "config.yaml")
BATCH = 4


@pytest.fixture(scope="module")
def data(smoke_inputs, smoke_caches) -> dict:
    vae = zarr.open_group(str(smoke_caches["vae"]), mode="r")
    dino = zarr.open_group(str(smoke_caches["dino"]), mode="r")
    clip = zarr.open_group(str(smoke_caches["clip"]), mode="r")
    return {"caches": smoke_caches, "sd15": smoke_inputs["sd15"], "vae": vae, "dino": dino,
            "clip": clip["embeddings"][:], "null_index": clip.attrs["null_index"], "rows": valid_rows(vae, dino),
            "scaling": vae.attrs["scaling_factor"]}


def settings_for(**overrides) -> dict:
    settings = train_settings(CONFIG, "smoke", "urepa")
    settings.update({"batch_size": BATCH, "max_steps": 8, "checkpoint_every": 8, "eval_interval": 8, **overrides})
    return settings


def make_trainer(data, settings: dict, run_dir: Path, noise_scheduler=None, num_workers: int = 0,
                 time_phases: bool = False) -> Trainer:
    return Trainer(load_unet(data["sd15"]), noise_scheduler or load_noise_scheduler(data["sd15"]),
                   CachedRows(data["caches"]["vae"], data["caches"]["dino"], data["caches"]["table"]["class_id"].to_numpy()),
                   data["rows"], data["clip"], data["null_index"], data["dino"].attrs["dim"],
                   data["dino"].attrs["grid"], data["scaling"], settings, run_dir, seed=0, device=CPU,
                   num_workers=num_workers, time_phases=time_phases, report_to="none")


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


def batch_of(trainer: Trainer, data, first: int = 0) -> dict:
    return trainer.dataset[data["rows"][first:first + BATCH]]


def alphas_cumprod(scheduler) -> np.ndarray:
    """SD-1.5's DDPM schedule from its config, by hand: scaled-linear betas, cumulative product of 1 - beta."""
    config = scheduler.config
    assert config.beta_schedule == "scaled_linear"
    betas = np.linspace(config.beta_start ** 0.5, config.beta_end ** 0.5, config.num_train_timesteps) ** 2
    return np.cumprod(1 - betas)


# -- 1. the objective as trained ------------------------------------------------------------------------
@pytest.mark.parametrize("prediction, snr_gamma", [("epsilon", None), ("v", None), ("epsilon", 5.0), ("v", 5.0)])
def test_loss_diff_is_the_mse_to_the_configured_target_from_the_steps_own_draws(data, tmp_path, prediction,
                                                                                 snr_gamma):
    """With a zero posterior std the latents are known (mean x scaling factor); the noise then follows from
    the U-Net's input and timesteps, and the target and loss are recomputed from it."""
    trainer = make_trainer(data, settings_for(prediction=prediction, snr_gamma=snr_gamma), tmp_path)
    spy = ForwardSpy(trainer)
    batch = batch_of(trainer, data)
    batch["latent_std"] = torch.zeros_like(batch["latent_std"])
    logged = trainer.step(batch)

    (call,) = spy.calls
    t = call["timesteps"].numpy()
    abar = alphas_cumprod(trainer.noise_scheduler)[t].reshape(-1, 1, 1, 1)
    x0 = batch["latent_mean"].double().numpy() * data["scaling"]
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


def test_latents_are_a_fresh_posterior_sample_times_the_scaling_factor_at_every_step(data, tmp_path):
    """A schedule without noise (all betas 0) hands the U-Net x0 itself: (mean + std * z) * scaling factor,
    with z standard normal and drawn anew at every step."""
    from diffusers import DDPMScheduler

    sd = load_noise_scheduler(data["sd15"])
    noiseless = DDPMScheduler.from_config(sd.config, trained_betas=[0.0] * sd.config.num_train_timesteps)
    trainer = make_trainer(data, settings_for(), tmp_path, noiseless)
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
        z = (call["sample"].double().numpy() / data["scaling"] - mean.double().numpy()) / 0.4
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
    settings = settings_for(align_layers=layers, manifold_mode=mode, manifold_upper_only=upper_only,
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


# -- 2. condition dropout -------------------------------------------------------------------------------
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
    assert len(set(data["caches"]["table"]["class_id"])) == len(data["clip"]) - 1


@pytest.mark.parametrize("rate", [0.0, 1.0])
def test_condition_dropout_at_zero_and_one(data, tmp_path, rate):
    dropped, _ = conditions(data, make_trainer(data, settings_for(cond_dropout=rate), tmp_path), 3)
    assert (dropped == bool(rate)).all()


def test_condition_dropout_at_one_half_is_per_image(data, tmp_path):
    steps = 30
    dropped, _ = conditions(data, make_trainer(data, settings_for(cond_dropout=0.5), tmp_path), steps)
    # 120 Bernoulli(1/2) draws: 60 +- 5.5; the bounds are 4 sigma.
    assert 38 <= dropped.sum() <= 82, dropped.sum()
    mixed = [s for s in range(steps) if 0 < dropped[s].sum() < BATCH]
    assert len(mixed) >= steps // 2, "dropout is drawn per batch, not per image"
    # every position of the batch is dropped sometimes and kept sometimes, in no fixed pattern
    assert all(5 <= n <= steps - 5 for n in dropped.sum(axis=0)), dropped.sum(axis=0)
    assert len({tuple(row) for row in dropped}) > steps // 3


# -- gradient accumulation --------------------------------------------------------------------------------
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
    settings = settings_for(manifold_mode=mode, manifold_coeff=3.0, align_coeff=align_coeff)
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


def test_every_random_draw_of_a_step_comes_from_the_checkpointed_generator(data, tmp_path):
    """Resume and several processes rely on it: replaying the generator's state replays the step's posterior
    sample, noise, timesteps and dropout exactly, whatever torch's global generator does meanwhile."""
    trainer = make_trainer(data, settings_for(cond_dropout=0.5), tmp_path)
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
    trainer = make_trainer(data, settings_for(), tmp_path, short)
    shape = batch_of(trainer, data)["latent_mean"].shape[1:]
    drawn = torch.cat([trainer.draw(shape)["timesteps"] for _ in range(100)]).numpy()
    counts = np.bincount(drawn, minlength=5)
    # 400 draws: 100 +- 8.7 per step; the bounds are 4 sigma
    assert counts[4] == 0 and all(65 <= n <= 135 for n in counts[:4]), counts


def test_the_learning_rate_warms_up_linearly_then_decays_on_a_cosine_and_is_logged(data, tmp_path):
    """diffusers' cosine schedule with warm-up, in optimiser steps: after step n, lr = base * n / W for n < W
    and base * (1 + cos(pi * (n - W) / (T - W))) / 2 after (W = warmup_ratio * T). The step logs the rate the
    next step will use, which is the optimiser's."""
    settings = settings_for(max_steps=8, warmup_ratio=0.25, learning_rate=1e-3)
    trainer = make_trainer(data, settings, tmp_path)
    base, warmup, total = 1e-3, 2, 8
    for n in range(1, total + 1):
        logged = trainer.step(batch_of(trainer, data))
        expected = base * n / warmup if n < warmup else \
            base * (1 + math.cos(math.pi * (n - warmup) / (total - warmup))) / 2
        assert logged["lr"] == pytest.approx(expected, abs=1e-12), n
        assert trainer.optimizer.param_groups[0]["lr"] == pytest.approx(expected, abs=1e-12), n


def test_a_nan_loss_before_any_checkpoint_says_there_is_none(data, tmp_path):
    trainer = make_trainer(data, settings_for(), tmp_path)
    batch = batch_of(trainer, data)
    batch["latent_mean"][0] = float("nan")
    with pytest.raises(FloatingPointError) as error:
        trainer.step(batch)
    message = str(error.value)
    assert message.startswith("non-finite loss at step 1: ")
    assert "the last good checkpoint is none (no checkpoint yet)." in message
    assert trainer.state.step == 0  # the bad step is not counted


# -- the run loop: log, snapshots, checkpoints, resume ----------------------------------------------------
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
    settings = settings_for(max_steps=6, eval_interval=4, checkpoint_every=2, checkpoints_total_limit=2)
    trainer, snapshots = run_trainer(data, settings, tmp_path)
    assert snapshots == [4, 6]  # every eval_interval steps, and the last step
    assert [p.name for p in trainer.checkpoints()] == ["checkpoint-4", "checkpoint-6"]
    assert not list((tmp_path / "checkpoints").glob("*.tmp"))
    log = pd.read_csv(tmp_path / "train_log.csv")
    assert list(log.columns) == ["step", "loss", "loss_diff", "loss_token", "loss_manifold", "align_coeff", "lr",
                                 "grad_norm", "step_time"]
    assert log["step"].tolist() == [1, 2, 3, 4, 5, 6]
    assert np.isfinite(log.drop(columns="step").to_numpy()).all() and (log["step_time"] > 0).all()


def test_a_killed_run_resumes_from_its_last_checkpoint_and_ends_as_an_uninterrupted_one(data, tmp_path):
    """Killed after step 5's log row (checkpoint-4 the newest), a new trainer on the same folder resumes at
    step 4, drops the logged row 5, redoes steps 5 and 6 and ends with the uninterrupted run's log, weights,
    EMA and generator. A leftover half checkpoint (*.tmp) is cleared before it is written into."""
    settings = settings_for(max_steps=6, eval_interval=1, checkpoint_every=2, checkpoints_total_limit=10)
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


def test_complete_checkpoints_are_ordered_by_step_and_skip_half_written_ones(tmp_path):
    for name in ("checkpoint-10", "checkpoint-9", "checkpoint-100.tmp", "checkpoint-2", "other-3"):
        (tmp_path / "checkpoints" / name).mkdir(parents=True)
    assert [p.name for p in complete_checkpoints(tmp_path)] == ["checkpoint-2", "checkpoint-9", "checkpoint-10"]
    assert complete_checkpoints(tmp_path / "none") == []


# -- what the trainer is built with ------------------------------------------------------------------------
def test_the_ema_averages_the_trained_weights_with_the_configured_decay(data, tmp_path):
    """diffusers' EMA with its warm-up: the first update copies the weights, the second mixes with decay
    min((1 + 1) / (10 + 1), ema_decay) = ema_decay for ema_decay = 0.1."""
    trainer = make_trainer(data, settings_for(ema_decay=0.1), tmp_path)
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
    trainer = make_trainer(data, settings_for(gradient_checkpointing=enabled), tmp_path)
    assert trainer.accelerator.unwrap_model(trainer.model).unet.is_gradient_checkpointing is enabled


@pytest.mark.parametrize("prediction, finetune, warned", [("v", "lora", True), ("v", "partial", False),
                                                          ("epsilon", "lora", False)])
def test_v_prediction_with_lora_is_warned_about(data, tmp_path, caplog, prediction, finetune, warned):
    with caplog.at_level("WARNING", logger="urepa.train"):
        make_trainer(data, settings_for(prediction=prediction, finetune=finetune), tmp_path)
    assert ("prediction 'v' with LoRA: SD-1.5 is an epsilon model" in caplog.text) is warned
    if warned:
        assert "use prediction: epsilon" in caplog.text


# -- the exported weights ------------------------------------------------------------------------------------
def unet_inputs(data, trainer: Trainer) -> tuple:
    latents = batch_of(trainer, data)["latent_mean"][:2].float() * data["scaling"]
    return latents, torch.tensor([50, 700]), torch.from_numpy(data["clip"][[0, data["null_index"]]]).float()


@pytest.mark.parametrize("finetune, prediction", [("lora", "epsilon"), ("partial", "v")])
def test_save_weights_exports_what_was_trained_in_diffusers_form(data, tmp_path, finetune, prediction):
    """LoRA: pytorch_lora_weights.safetensors, which a stock pipeline loads into the trained U-Net; partial:
    a unet/ folder. Both: the scheduler with the trained parameterisation, and the align heads with what
    rebuilds them."""
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel
    from safetensors.torch import load_file

    settings = settings_for(finetune=finetune, prediction=prediction, learning_rate=1e-2)
    trainer = make_trainer(data, settings, tmp_path / "run")
    trainer.step(batch_of(trainer, data))
    model = trainer.accelerator.unwrap_model(trainer.model)
    inputs = unet_inputs(data, trainer)
    expected = unet_prediction(model.unet, inputs)
    trainer.save_weights(tmp_path / "out")

    pipeline = StableDiffusionPipeline.from_pretrained(str(data["sd15"]), local_files_only=True)
    base = unet_prediction(pipeline.unet, inputs)
    if finetune == "lora":
        assert not (tmp_path / "out" / "unet").exists()
        pipeline.load_lora_weights(str(tmp_path / "out"))
        loaded = unet_prediction(pipeline.unet, inputs)
    else:
        assert not (tmp_path / "out" / "pytorch_lora_weights.safetensors").exists()
        loaded = unet_prediction(UNet2DConditionModel.from_pretrained(str(tmp_path / "out" / "unet")), inputs)
    assert (expected - base).abs().max() > 1e-4, "the step changed nothing: the comparison would prove nothing"
    torch.testing.assert_close(loaded, expected, rtol=1e-5, atol=1e-5)

    scheduler = json.loads((tmp_path / "out" / "scheduler" / "scheduler_config.json").read_text())
    assert scheduler["prediction_type"] == {"epsilon": "epsilon", "v": "v_prediction"}[prediction]
    assert scheduler["num_train_timesteps"] == trainer.noise_scheduler.config.num_train_timesteps
    heads = load_file(tmp_path / "out" / "align_heads.safetensors")
    assert heads.keys() == model.heads.state_dict().keys()
    for key, value in model.heads.state_dict().items():
        assert torch.equal(heads[key], value)
    meta = json.loads((tmp_path / "out" / "align_heads.json").read_text())
    assert meta == {"layers": settings["align_layers"], "grid": data["dino"].attrs["grid"],
                    "projector": settings["projector"], "projector_hidden": settings["projector_hidden"],
                    "dim": data["dino"].attrs["dim"]}


def test_the_baseline_exports_no_align_heads(data, tmp_path):
    trainer = make_trainer(data, settings_for(align_coeff=0.0), tmp_path / "run")
    trainer.save_weights(tmp_path / "out")
    assert (tmp_path / "out" / "pytorch_lora_weights.safetensors").is_file()
    assert not list((tmp_path / "out").glob("align_heads.*"))


def test_data_workers_load_the_same_batches_in_the_same_order(data, tmp_path):
    """num_workers reading processes, kept for the whole run, hand out the batches StepBatches orders, as the
    main process alone would."""
    loaders = {workers: make_trainer(data, settings_for(), tmp_path / str(workers), num_workers=workers).batches(3)
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
    trainer = make_trainer(data, settings_for(), tmp_path, time_phases=enabled)
    trainer.step(batch_of(trainer, data))
    totals = trainer.timer.totals
    if enabled:
        assert set(totals) == {"forward", "alignment", "backward", "optimizer", "ema"}
        assert all(seconds > 0 for seconds in totals.values())
    else:
        assert not totals
