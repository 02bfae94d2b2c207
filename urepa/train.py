"""Stage 3: fine-tune the SD-1.5 U-Net on the caches with L = L_diff + lambda (L_token + w L_manifold).

Resumable (accelerate checkpoints hold model, optimiser, LR scheduler, EMA, the step and the state
of the one generator every random draw comes from; batches are a pure function of seed and step),
so a killed run started again ends with the weights an uninterrupted run would have.

On several processes (urepa.launch) or with gradient accumulation, every step trains on the same global
batch, noise, timesteps, condition dropout and sample-mode Gram as on one process: the result does not depend
on the process count or on `grad_accum` beyond floating-point reordering, and a run resumes on another count.

This module is the loop and the run: the objective is `urepa.losses.Objective`, the batches and draws are
`urepa.batches`', the state folder is `urepa.runstate`'s and the exported folder `urepa.export`'s.
"""
from __future__ import annotations

import contextlib
import csv
import json
import logging
import os
import shutil
import time
from collections import defaultdict
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch.utils.data import DataLoader

from . import export
from .batches import GlobalBatch, StepBatches, TrainState, process_share
from .config import SPEED_KEYS, without_launch
from .digests import content_digest, file_digest, weights_fingerprint
from .images import dinov2_view
from .losses import AlignSchedule, Objective, diffusion_target, pooled_samples
from .models import AlignedUNet, ema_swapped, make_trainable, speed_up
from .plots import plot_losses
from .rowstore import CachedRows, check_cache, valid_rows
from .runstate import (StopSignals, checkpoint_trained_state, claim_run_state, complete_checkpoints,
                       load_newest_checkpoint, run_state_dir, save_checkpoint, training_code_digest)
from .runtime import PhaseTimer, pinned_memory, progress, provenance, set_tf32
from .vae import LatentNormalisation, check_same_vae, vae_record

log = logging.getLogger(__name__)

LOG_COLUMNS = ["step", "loss", "loss_diff", "loss_token", "loss_manifold", "align_coeff", "lr", "grad_norm",
               "step_time"]
LOSS_TERMS = ["loss", "loss_diff", "loss_token", "loss_manifold"]


class Trainer:
    """One training run. Built from loaded parts so benchmarks can hand it random full-size models."""

    def __init__(self, unet, noise_scheduler, dataset: CachedRows, rows: np.ndarray, clip_embeddings: np.ndarray,
                 null_index: int, token_dim: int, token_grid: int, latent_normalisation: LatentNormalisation,
                 vae: dict, settings: dict, run_dir: str | Path, seed: int, device: str | torch.device,
                 num_workers: int, time_phases: bool, report_to: str):
        from accelerate import Accelerator
        from accelerate.utils import ProjectConfiguration
        from diffusers.optimization import get_scheduler
        from diffusers.training_utils import EMAModel, cast_training_params

        self.settings, self.run_dir, self.seed, self.token_dim = settings, Path(run_dir), seed, token_dim
        device = torch.device(device)
        cpu = device.type == "cpu"
        self.accelerator = Accelerator(
            mixed_precision="no" if cpu else settings["mixed_precision"], cpu=cpu,
            log_with=None if report_to == "none" else report_to, project_config=ProjectConfiguration(
                project_dir=str(self.run_dir), logging_dir=str(self.run_dir / "tensorboard")),
            # The prepared scheduler would otherwise step once per process at every optimiser step (accelerate
            # assumes each process adds its own batch): warm-up and decay would end N times early. Our global
            # batch is the same on any number of processes, so the schedule runs in optimiser steps.
            step_scheduler_with_optimizer=False,
        )
        self.grad_accum = settings["grad_accum"]
        self.device = self.accelerator.device
        self.noise_scheduler, self.null_index = noise_scheduler, null_index
        self.latent_normalisation = latent_normalisation  # the VAE's, from its config: z -> the U-Net's latents
        self.vae = vae  # name, path and fingerprint of the VAE the cached latents came from: recorded with the weights
        self.prediction = settings["prediction"]
        if self.prediction == "v" and settings["finetune"] == "lora":
            log.warning(
                "prediction 'v' with LoRA: SD-1.5 is an epsilon model, and v = sqrt(abar)*eps - sqrt(1-abar)*x0 "
                "asks LoRA layers in the 8x8 blocks to learn to subtract a full-resolution copy of x_t "
                "(weight 1/sqrt(abar), ~14.6 at t = 999) behind frozen skips and conv_out. Both baseline and "
                "U-REPA would then measure that re-parameterisation, not alignment; use prediction: epsilon.")

        # The LoRA (gaussian) and align-head initialisations draw from torch's global generator, whose
        # default seed differs per process: seed it, so `seed` fixes the starting weights too.
        torch.manual_seed(seed)
        make_trainable(unet, settings["finetune"], settings["lora_rank"], settings["lora_targets"])
        if settings["gradient_checkpointing"]:
            unet.enable_gradient_checkpointing()
        aligning = settings["align_coeff"] > 0
        self.model = AlignedUNet(unet, settings["align_layers"] if aligning else [], token_dim, token_grid,
                                      settings["projector"], settings["projector_hidden"])
        self.model.to(self.device)
        if settings["finetune"] == "lora" and self.accelerator.mixed_precision == "bf16":
            # Frozen base weights in bf16 halve memory and traffic; LoRA and heads stay fp32 masters.
            unet.to(torch.bfloat16)
            cast_training_params(self.model, dtype=torch.float32)
        # The speed options (config `train`): how the step runs, not what it computes.
        set_tf32(settings["tf32"], self.device)
        speed_up(unet, settings["channels_last"], settings["compile"])
        self.channels_last = settings["channels_last"]
        self.pin_memory = pinned_memory(settings["pin_memory"], self.device)
        self.align_schedule = AlignSchedule(settings["align_coeff"], **settings["align_schedule"])

        self.trainable = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(self.trainable, lr=settings["learning_rate"], betas=(0.9, 0.999),
                                           weight_decay=settings["weight_decay"], fused=settings["fused_adamw"])
        self.lr_scheduler = get_scheduler(
            "cosine", self.optimizer, num_warmup_steps=int(settings["warmup_ratio"] * settings["max_steps"]),
            num_training_steps=settings["max_steps"])
        self.ema = EMAModel(self.trainable, decay=settings["ema_decay"])
        # Seeded alike on every process: each draws the whole global batch's randomness and takes its own rows.
        self.generator = torch.Generator(self.device).manual_seed(seed * 1000)
        self.sample_gram = aligning and settings["manifold_mode"] == "sample"
        # The sample-mode Gram of the global batch needs the other micro-batches' pooled tokens: one extra
        # forward pass without gradient per step when accumulating (skipped where the term has no weight).
        self.prepass = self.sample_gram and settings["manifold_coeff"] > 0 and self.grad_accum > 1
        self.state = TrainState(self.generator)
        self.model, self.optimizer, self.lr_scheduler = self.accelerator.prepare(
            self.model, self.optimizer, self.lr_scheduler)
        self.accelerator.register_for_checkpointing(self.ema, self.state)
        checkpoint_trained_state(self.accelerator)  # not the frozen weights

        self.clip = torch.from_numpy(np.asarray(clip_embeddings)).to(self.device, torch.float32)
        self.dataset, self.rows, self.num_workers = dataset, rows, num_workers
        self.timer = PhaseTimer(time_phases, self.device)
        self.objective = Objective.from_settings(noise_scheduler, settings, self.timer)
        self.accelerator.unwrap_model(self.model).timer = self.timer

    # -- checkpoints ------------------------------------------------------------------------------
    def checkpoints(self) -> list[Path]:
        return complete_checkpoints(self.run_dir)

    def resume(self) -> int:
        """Load the newest intact checkpoint, if any; return the step to continue from."""
        return load_newest_checkpoint(self.accelerator, self.run_dir, self.state)

    def save_checkpoint(self) -> Path:
        return save_checkpoint(self.accelerator, self.run_dir, self.state.step,
                               self.settings["checkpoints_total_limit"])

    # -- one step ---------------------------------------------------------------------------------
    def batches(self, start_step: int) -> DataLoader:
        sampler = StepBatches(self.rows, self.settings["batch_size"], self.seed, start_step,
                              self.accelerator.process_index, self.accelerator.num_processes, self.grad_accum)
        return DataLoader(self.dataset, sampler=sampler, batch_size=None, num_workers=self.num_workers,
                          pin_memory=self.pin_memory, persistent_workers=self.num_workers > 0)

    def step(self, batch: dict[str, torch.Tensor]) -> dict[str, float]:
        """One optimiser step on this process's share of the step's global batch (`process_share`):
        grad_accum micro-batches, gradients synchronised across processes on the last one."""
        settings, device, accumulate = self.settings, self.device, self.grad_accum
        processes = self.accelerator.num_processes
        share = torch.from_numpy(process_share(settings["batch_size"], self.accelerator.process_index, processes,
                                               accumulate)).to(device)
        mean = batch["latent_mean"].to(device, torch.float32, non_blocking=True)
        std = batch["latent_std"].to(device, torch.float32, non_blocking=True)
        target_tokens = batch["tokens"].to(device, torch.float32, non_blocking=True)
        draws = self.draw(mean.shape[1:])
        latents = self.latent_normalisation.normalise(mean + std * draws["posterior"][share])
        noise, timesteps = draws["noise"][share], draws["timesteps"][share]
        classes = torch.where(draws["dropped"][share], self.null_index, batch["class_id"].to(device))
        noisy = self.noise_scheduler.add_noise(latents, noise, timesteps)
        if self.channels_last:
            noisy = noisy.contiguous(memory_format=torch.channels_last)
        inputs = {"noisy": noisy, "timesteps": timesteps,
                  "encoder_hidden_states": self.clip[classes], "tokens": target_tokens,
                  "target": diffusion_target(self.noise_scheduler, latents, noise, timesteps, self.prediction)}
        micro_batches = [dict(zip(inputs, part)) for part in zip(*(v.chunk(accumulate) for v in inputs.values()))]

        align_coeff = self.align_schedule(self.state.step)
        known = self.pooled_global_batch(micro_batches) if self.prepass else None
        terms = []
        for micro, micro_batch in enumerate(micro_batches):
            gathers = self.sample_gram and (processes > 1 or known is not None)
            gather = GlobalBatch(micro, processes, known) if gathers else None
            # Gradients add up locally; the processes exchange them once, in the last micro-batch's backward.
            with self.accelerator.no_sync(self.model) if micro < accumulate - 1 else contextlib.nullcontext():
                micro_terms, loss = self.micro_step(micro_batch, align_coeff, gather)
                with self.timer("backward"):
                    self.accelerator.backward(loss)
            terms.append(micro_terms)
        # Means over the micro-batches and the processes: the global batch's values, as one process logs them.
        means = self.accelerator.reduce(torch.stack(terms).mean(dim=0), reduction="mean")
        values = dict(zip(LOSS_TERMS, means.tolist()))
        if not np.isfinite(values["loss"]):
            # Numbered as train_log.csv and the checkpoints number steps: step n is the n-th update.
            raise FloatingPointError(
                f"non-finite loss at step {self.state.step + 1}: {values}. Training stopped; the last good "
                f"checkpoint is {self.checkpoints()[-1] if self.checkpoints() else 'none (no checkpoint yet)'}. "
                f"Lower learning_rate or align_coeff, or check the caches for NaN rows.")
        with self.timer("optimizer"):
            grad_norm = self.accelerator.clip_grad_norm_(self.trainable, settings["max_grad_norm"])
            self.optimizer.step()
            if not self.accelerator.optimizer_step_was_skipped:  # fp16 loss scaling skipped it: so does accelerate
                self.lr_scheduler.step()
            self.optimizer.zero_grad(set_to_none=True)
        with self.timer("ema"):
            self.ema.step(self.trainable)
        self.state.step += 1
        values.update(align_coeff=align_coeff, lr=self.lr_scheduler.get_last_lr()[0], grad_norm=float(grad_norm))
        return values

    def draw(self, latent_shape: torch.Size) -> dict[str, torch.Tensor]:
        """Every random draw of a step, for the whole global batch, from the checkpointed generator: a fresh
        posterior sample, the noise, the timestep and the condition dropout (drawn here, not in the data
        workers). Every process draws them all and takes its own rows."""
        generator, device, size = self.generator, self.device, self.settings["batch_size"]
        shape = (size, *latent_shape)
        return {
            "posterior": torch.randn(shape, generator=generator, device=device),
            "noise": torch.randn(shape, generator=generator, device=device),
            "timesteps": torch.randint(0, self.noise_scheduler.config.num_train_timesteps, (size,),
                                       generator=generator, device=device),
            "dropped": torch.rand(size, generator=generator, device=device) < self.settings["cond_dropout"],
        }

    def micro_step(self, inputs: dict[str, torch.Tensor], align_coeff: float,
                   gather: GlobalBatch | None) -> tuple[torch.Tensor, torch.Tensor]:
        """The forward pass of one micro-batch: its LOSS_TERMS, and the loss to back-propagate (`Objective`)."""
        with self.accelerator.autocast():
            prediction, pred_tokens = self.model(inputs["noisy"], inputs["timesteps"], inputs["encoder_hidden_states"])
        return self.objective(prediction, inputs["target"], inputs["timesteps"], pred_tokens, inputs["tokens"],
                              align_coeff, self.grad_accum, gather)

    @torch.no_grad()
    def pooled_global_batch(self, micro_batches: list[dict[str, torch.Tensor]]) -> dict[str, tuple]:
        """Per aligned layer, the global batch's pooled pred rows and pooled target rows (urepa.losses.
        pooled_samples) in GlobalBatch's order, from a forward pass without gradient."""
        model = self.accelerator.unwrap_model(self.model)
        preds, targets = defaultdict(list), []
        for inputs in micro_batches:
            with self.accelerator.autocast():
                _, pred_tokens = model(inputs["noisy"], inputs["timesteps"], inputs["encoder_hidden_states"])
            for layer, tokens in pred_tokens.items():
                preds[layer].append(self.accelerator.gather(pooled_samples(tokens)))
            targets.append(self.accelerator.gather(pooled_samples(inputs["tokens"])))
        target = torch.cat(targets)
        return {layer: (torch.cat(rows), target) for layer, rows in preds.items()}

    # -- the run ----------------------------------------------------------------------------------
    def run(self, on_snapshot=None) -> None:
        settings = self.settings
        start = self.resume()
        max_steps = settings["max_steps"]
        # Scalars only: trackers take flat hyper-parameters (align_layers, align_schedule as text).
        self.accelerator.init_trackers("urepa", config={
            k: v if isinstance(v, (int, float, str, bool)) else json.dumps(v) for k, v in settings.items()})
        log_path = self.run_dir / "train_log.csv"
        main = self.accelerator.is_main_process
        if main:
            _truncate_log(log_path, start)
        # Only the main process writes the step log; the others log to nowhere.
        with open(log_path if main else os.devnull, "a", newline="") as log_file:
            writer = csv.DictWriter(log_file, fieldnames=LOG_COLUMNS)
            if main and log_file.tell() == 0:
                writer.writeheader()
            bar = progress(total=max_steps, initial=start, desc="train", unit="step",
                            disable=not self.accelerator.is_main_process)
            batches = iter(self.batches(start)) if start < max_steps else iter(())
            with StopSignals() as stop:
                while self.state.step < max_steps:
                    tick = time.perf_counter()
                    with self.timer("data"):
                        batch = next(batches)
                    values = self.step(batch)
                    values["step_time"] = time.perf_counter() - tick
                    values["step"] = step = self.state.step
                    writer.writerow({k: values[k] for k in LOG_COLUMNS})
                    self.accelerator.log({k: v for k, v in values.items() if k != "step"}, step=step)
                    bar.update(1)
                    shown = {"loss": f"{values['loss']:.4f}"}
                    if np.isfinite(values["loss_token"]):  # the baseline has no token term: not shown as nan
                        shown["token"] = f"{values['loss_token']:.3f}"
                    bar.set_postfix(shown, refresh=False)
                    # Snapshot before checkpoint: a run killed between the two redoes this step's snapshot.
                    if on_snapshot and (step % settings["eval_interval"] == 0 or step == max_steps):
                        on_snapshot(self, step)
                    stop.after_step(self.accelerator, step,
                                    step % settings["checkpoint_every"] == 0 or step == max_steps,
                                    lambda: log_file.flush() or self.save_checkpoint())
            bar.close()
        # Every process reaches the end before the group is taken down: rank 0 could otherwise abort at exit.
        self.accelerator.wait_for_everyone()
        self.accelerator.end_training()

    # -- artifacts --------------------------------------------------------------------------------
    def ema_weights(self):
        """Temporarily swap the EMA weights into the trainable parameters."""
        return ema_swapped(self.ema, self.trainable)

    def save_weights(self, out_dir: str | Path, base_unet: dict | None = None, trained_only: bool = False) -> None:
        """The current trainable weights as an exported model folder (urepa.export.save_weights: `base_unet`, the
        U-Net training started from; `trained_only`, the trained parameters without the frozen ones)."""
        export.save_weights(out_dir, self.accelerator.unwrap_model(self.model), self.noise_scheduler, self.settings,
                            self.token_dim, self.vae, base_unet, trained_only)


def _truncate_log(path: Path, step: int) -> None:
    """Drop rows a killed run logged after its last checkpoint: they are about to be redone."""
    if path.exists():
        table = pd.read_csv(path)
        table[table["step"] <= step].to_csv(path, index=False)


def train_run(caches: dict[str, str], sd15_dir: str, dinov2_path: str, vae_dir: str, settings: dict,
              states_dir: str | Path, model_dir: str | Path, seed: int, device: torch.device, num_workers: int,
              title: str, image_size: int, dino_size: int, report_to: str = "tensorboard") -> Path:
    """Check the caches against this run's inputs (`vae_dir`: the AutoencoderKL folder of the run's VAE,
    `settings["vae"]`; `image_size`: the VAE's square; `dino_size`: DINOv2's input size for that square), train
    (resuming if possible), export artifacts. Returns the run's state folder: `states_dir/<identity>/` (see
    `claim_run_state`). Called by every process of a run
    (urepa.launch); the main process claims the state folder and exports."""
    from accelerate import PartialState

    from .sd15 import load_noise_scheduler, load_unet

    state = PartialState(cpu=device.type == "cpu")  # the process group, set up by accelerate launch
    processes = state.num_processes
    if settings["processes"] != processes:
        raise ValueError(f"train.processes is {settings['processes']} but this run has {processes} process(es): "
                         f"start it with urepa.launch.train, which launches train.processes processes")
    process_share(settings["batch_size"], 0, processes, settings["grad_accum"])  # a clear error before any work

    csv_sha = file_digest(caches["csv"])
    run_vae = vae_record(settings["vae"], vae_dir)
    vae = check_cache(caches["vae"], {"csv_sha256": csv_sha, "image_size": image_size})
    check_same_vae(vae.attrs.get("vae", {"name": vae.attrs["encoder"], "path": caches["vae"],
                                         "fingerprint": vae.attrs["encoder_fingerprint"]}),
                   run_vae, f"latent cache {caches['vae']}")
    dino = check_cache(caches["dino"], {"csv_sha256": csv_sha, "encoder_fingerprint": weights_fingerprint(dinov2_path),
                                        "view": dinov2_view(image_size, dino_size)})
    # verified whole: a full pass over the CLIP cache is a fraction of a second
    clip = check_cache(caches["clip"], {"encoder_fingerprint": weights_fingerprint(Path(sd15_dir) / "text_encoder")},
                       verify=True)
    table = pd.read_csv(caches["csv"])
    rows = valid_rows(vae, dino)
    if len(rows) < len(table):
        log.warning("skipping %d invalid cached rows of %d", len(table) - len(rows), len(table))
    unet = load_unet(sd15_dir)
    if unet.config.cross_attention_dim != clip.attrs["dim"]:
        raise ValueError(f"CLIP cache dim {clip.attrs['dim']} does not match the U-Net's cross-attention dim "
                         f"{unet.config.cross_attention_dim}")
    model_dir = Path(model_dir)
    # Checkpoints and snapshots hold the trained parameters only: the frozen ones are this U-Net's.
    base_unet = export.base_unet_record(sd15_dir)
    identity = {
        "settings": without_launch(settings), "seed": seed, "csv_sha256": csv_sha, "code": training_code_digest(),
        "base_unet": base_unet["fingerprint"],
        "caches": {"vae": content_digest(vae), "dino": content_digest(dino), "clip": content_digest(clip)}}
    with state.main_process_first():  # the others find the folder the main process has claimed
        # provenance: what changes the weights' last bits without changing the run (threads, device, build)
        launch = {"processes": processes, "grad_accum": settings["grad_accum"], **{k: settings[k] for k in SPEED_KEYS},
                  **provenance(device, mixed_precision=settings["mixed_precision"])}
        run_dir = (claim_run_state(Path(states_dir), identity, launch)
                   if state.is_main_process else run_state_dir(Path(states_dir), identity))
    trainer = Trainer(
        unet, load_noise_scheduler(sd15_dir), CachedRows(caches["vae"], caches["dino"], table["class_id"].to_numpy()),
        rows, clip["embeddings"][:], clip.attrs["null_index"], dino.attrs["dim"], dino.attrs["grid"],
        LatentNormalisation.from_config(json.loads((Path(vae_dir) / "config.json").read_text())), run_vae, settings,
        run_dir, seed, device, num_workers, time_phases=False, report_to=report_to)

    def snapshot(trainer: Trainer, step: int) -> None:
        if trainer.accelerator.is_main_process:
            with trainer.ema_weights():
                trainer.save_weights(run_dir / "snapshots" / f"step-{step:07d}", base_unet, trained_only=True)

    trainer.run(on_snapshot=snapshot)
    if not trainer.accelerator.is_main_process:
        return run_dir
    if model_dir.exists():  # a previous export of this rule (Snakemake removes it first; direct calls do not)
        shutil.rmtree(model_dir)
    model_dir.mkdir(parents=True)
    trainer.save_weights(model_dir, base_unet)  # whole U-Nets: loadable by a stock pipeline
    with trainer.ema_weights():
        trainer.save_weights(model_dir / "ema", base_unet)
    export.link_tree(run_dir / "snapshots", model_dir / "snapshots")
    shutil.copy(run_dir / "train_log.csv", model_dir / "train_log.csv")
    plot_losses(model_dir / "train_log.csv", model_dir / "loss_curve.png", title)
    (model_dir / "config.json").write_text(json.dumps({
        "settings": settings, "seed": seed, "sd15_dir": str(sd15_dir), "dinov2": str(dinov2_path),
        "caches": {name: str(path) for name, path in caches.items()},
        "token_grid": dino.attrs["grid"], "token_dim": dino.attrs["dim"], "trained_rows": int(len(rows)),
        "final_step": trainer.state.step, "run_state": str(run_dir),
        "launches": json.loads((run_dir / "run.json").read_text())["launches"],
    }, indent=2))
    return run_dir


