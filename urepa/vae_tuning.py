"""Stage 3b (REPA-E, part 2): tune SD-1.5's VAE end to end through the alignment loss, with the U-Net's LoRA and
heads trained alongside (`urepa.end_to_end` holds the three passes' losses).

Data: the subset's images at the caches' square (`vae_transform`), the DINOv2 token cache for the targets, the
CLIP cache for the conditions, and the frozen VAE's latent cache for the normaliser's reference moments and the
optional anchor. A step: the VAE pass (AdamW on the VAE), the discriminator pass when the GAN term is on
(AdamW on D), the U-Net pass (AdamW on LoRA + heads, cosine schedule, EMA), each clipped at `max_grad_norm`.
Resumable as `train_unet` is (accelerate checkpoints of every model, optimiser, scheduler, the normaliser's
buffers, the EMA and the generator, in a state folder named by the run's identity), with a collapse guard.
On several processes (urepa.launch, `train.processes`) every process draws the whole global batch's randomness and
takes its own rows, each pass's gradients are averaged across the processes, and the logged values, the latent
moments and the sample-mode Gram are the global batch's: the run is the one-process run up to the sums' order.

Export: `vae/`, the tuned VAE with the normaliser folded into its 1x1 convolutions (a diffusers AutoencoderKL with
SD-1.5's scaling_factor, loadable as a stock pipeline's `vae`); `unet/`, the U-Net weights trained alongside (an
exported weights folder as `train_unet` writes, recorded as trained on the tuned VAE, with `ema/`);
`train_log.csv`, `losses.png`, `latent_stats.json`, `config.json`.
"""
from __future__ import annotations

import copy
import csv
import json
import logging
import os
import shutil
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch.utils.data import DataLoader

from . import export
from .batches import GlobalBatch, StepBatches, TrainState, process_share
from .config import SPEED_KEYS, without_launch
from .digests import content_digest, file_digest, weights_fingerprint
from .discriminator import PatchDiscriminator
from .end_to_end import EndToEnd, VaeLossWeights
from .images import dinov2_view, open_rgb, vae_transform
from .latent_pinning import MomentPinning, cache_moments, fold_into_vae
from .losses import AlignSchedule, Objective
from .models import AlignedUNet, ema_swapped, make_trainable, speed_up
from .rowstore import CachedRows, check_cache, valid_rows
from .runstate import (StopSignals, checkpoint_trained_state, claim_run_state, complete_checkpoints,
                       load_newest_checkpoint, run_state_dir, save_checkpoint, training_code_digest)
from .runtime import PhaseTimer, pinned_memory, progress, provenance, set_tf32
from .vae import SD15_VAE, LatentNormalisation, check_same_vae, vae_record

log = logging.getLogger(__name__)

# The modules that define the tuning objective and loop: part of a tuning run's identity.
TUNING_CODE = ("vae_tuning.py", "end_to_end.py", "latent_pinning.py", "discriminator.py", "losses.py", "models.py",
               "batches.py")
VAE_TERMS = ["l1", "lpips", "kl", "gan", "align", "anchor"]
LOG_COLUMNS = (["step", "loss_vae", *VAE_TERMS, "loss_d", "logits_real", "logits_fake", "loss_unet", "loss_diff",
                "loss_token", "loss_manifold", "align_coeff", "lr_vae", "lr_unet", "lr_d", "grad_norm_vae",
                "grad_norm_d", "grad_norm_unet"]
               + [f"latent_{moment}_{c}" for moment in ("mean", "std") for c in range(4)] + ["step_time"])


def tuning_share(batch_size: int, rank: int, processes: int) -> np.ndarray:
    """Positions of process `rank`'s rows in a tuning step's global batch (`process_share`, no accumulation)."""
    if batch_size % processes:
        raise ValueError(f"vae_tune.batch_size {batch_size} does not divide by train.processes {processes}: every "
                         f"process takes an equal share of every step's batch. Use a multiple of {processes}.")
    return process_share(batch_size, rank, processes, 1)


class CollapseError(RuntimeError):
    """The tuned VAE or the U-Net beside it stopped learning or lost its latent spread."""


class TuningRows(CachedRows):
    """`CachedRows` (frozen latent moments, DINOv2 tokens, class ids) plus each row's image at the caches' square,
    in [-1, 1], decoded in the data workers."""

    def __init__(self, image_paths: list[str], image_size: int, vae_path, dino_path, class_ids: np.ndarray):
        super().__init__(vae_path, dino_path, class_ids)
        self.image_paths, self.transform = list(image_paths), vae_transform(image_size)

    def __getitem__(self, rows) -> dict[str, torch.Tensor]:
        batch = super().__getitem__(rows)
        batch["image"] = torch.stack([self.transform(open_rgb(self.image_paths[int(row)])) for row in batch["row"]])
        return batch


def rows_per_class(table: pd.DataFrame, rows: np.ndarray, images_per_class: int | None) -> np.ndarray:
    """The first `images_per_class` valid rows of every class (all of them for None), in row order."""
    if images_per_class is None:
        return rows
    valid = table.iloc[rows].assign(row=rows)
    return np.sort(valid.groupby("class_id", sort=False).head(images_per_class)["row"].to_numpy())


class VaeTuner:
    """One tuning run on one process. Built from loaded parts, so tests and benchmarks can hand it any models."""

    def __init__(self, vae, unet, noise_scheduler, dataset: TuningRows, rows: np.ndarray, clip_embeddings,
                 null_index: int, token_dim: int, token_grid: int, reference_moments: tuple, lpips_model,
                 unet_settings: dict, tune: dict, run_dir: str | Path, seed: int, device, num_workers: int,
                 vae_name: str, discriminator_state: dict | None = None, time_phases: bool = False):
        from accelerate import Accelerator
        from accelerate.utils import ProjectConfiguration
        from diffusers.optimization import get_scheduler
        from diffusers.training_utils import EMAModel

        self.unet_settings, self.tune, self.run_dir, self.seed = unet_settings, tune, Path(run_dir), seed
        self.vae_name, self.token_dim = vae_name, token_dim
        device = torch.device(device)
        cpu = device.type == "cpu"
        self.accelerator = Accelerator(
            mixed_precision="no" if cpu else unet_settings["mixed_precision"], cpu=cpu,
            project_config=ProjectConfiguration(project_dir=str(self.run_dir)), step_scheduler_with_optimizer=False)
        self.device, self.processes = self.accelerator.device, self.accelerator.num_processes
        # This process's rows of every step's global batch: the draws are the global batch's, as on one process.
        self.share = torch.from_numpy(tuning_share(tune["batch_size"], self.accelerator.process_index,
                                                   self.processes)).to(self.device)
        self.noise_scheduler, self.null_index = noise_scheduler, null_index

        torch.manual_seed(seed)  # LoRA, heads and discriminator initialisations
        make_trainable(unet, unet_settings["finetune"], unet_settings["lora_rank"], unet_settings["lora_targets"])
        if unet_settings["gradient_checkpointing"]:
            unet.enable_gradient_checkpointing()
        model = AlignedUNet(unet, unet_settings["align_layers"], token_dim, token_grid, unet_settings["projector"],
                            unet_settings["projector_hidden"])
        vae.requires_grad_(True).train()
        if tune["gradient_checkpointing"]:
            vae.enable_gradient_checkpointing()
        self.gan = tune["gan"]
        discriminator = PatchDiscriminator() if self.gan else None
        if discriminator is not None and discriminator_state is not None:
            discriminator.load_state_dict(discriminator_state)
        if discriminator is not None and self.processes > 1:
            if self.device.type == "cuda":  # D's BatchNorm normalises over the global batch, as on one process
                discriminator = torch.nn.SyncBatchNorm.convert_sync_batchnorm(discriminator)
            else:
                log.warning("the discriminator's BatchNorm normalises each process's share on the CPU (SyncBatchNorm "
                            "needs CUDA): the GAN terms differ from a one-process run")
        weights = VaeLossWeights(l1=tune["l1_weight"], lpips=tune["lpips_weight"], kl=tune["kl_weight"],
                                 gan=tune["gan_weight"], align=tune["vae_align_coeff"], anchor=tune["anchor_weight"],
                                 align_terms=tune["vae_align_terms"])
        pinning = MomentPinning(*reference_moments, momentum=tune["normaliser_momentum"])
        normalisation = LatentNormalisation.from_config(vae.config)
        self.e2e = EndToEnd(vae, model, pinning, normalisation, Objective.from_settings(noise_scheduler, unet_settings),
                            lpips_model, weights, discriminator).to(self.device)
        self.align_schedule = AlignSchedule(unet_settings["align_coeff"], **unet_settings["align_schedule"])
        # The speed options (config `train`, as train_unet's): how the passes run, not what they compute. NHWC
        # applies to all three convolutional networks; compile, as in train_unet, to the U-Net alone.
        set_tf32(unet_settings["tf32"], self.device)
        speed_up(unet, unet_settings["channels_last"], unet_settings["compile"])
        for convolutional in (vae, discriminator):
            if convolutional is not None:
                speed_up(convolutional, unet_settings["channels_last"], compile=False)
        self.channels_last = unet_settings["channels_last"]
        self.pin_memory = pinned_memory(unet_settings["pin_memory"], self.device)

        def adamw(params, lr, weight_decay):
            return torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.999), weight_decay=weight_decay,
                                     fused=unet_settings["fused_adamw"])

        self.vae_params = list(vae.parameters())
        self.unet_params = [p for p in model.parameters() if p.requires_grad]
        self.vae_optimizer = adamw(self.vae_params, tune["vae_learning_rate"], tune["weight_decay"])
        self.unet_optimizer = adamw(self.unet_params, unet_settings["learning_rate"], unet_settings["weight_decay"])
        max_steps = tune["max_steps"]
        self.vae_scheduler = get_scheduler("constant", self.vae_optimizer)
        self.unet_scheduler = get_scheduler(
            "cosine", self.unet_optimizer, num_warmup_steps=int(unet_settings["warmup_ratio"] * max_steps),
            num_training_steps=max_steps)
        self.ema = EMAModel(self.unet_params, decay=unet_settings["ema_decay"])
        self.generator = torch.Generator(self.device).manual_seed(seed * 1000 + 1)
        self.state = TrainState(self.generator)
        models = [vae, model]
        prepared = [self.vae_optimizer, self.unet_optimizer, self.vae_scheduler, self.unet_scheduler]
        if discriminator is not None:
            self.d_params = list(discriminator.parameters())
            self.d_optimizer = adamw(self.d_params, tune["disc_learning_rate"], tune["weight_decay"])
            self.d_scheduler = get_scheduler("constant", self.d_optimizer)
            models.append(discriminator)
            prepared += [self.d_optimizer, self.d_scheduler]
        # Not wrapped in DistributedDataParallel: the VAE pass runs the U-Net bare (frozen, stopped early) and each
        # pass back-propagates into one model's parameters only, so `_update` averages each pass's gradients itself.
        for module in models:
            self.accelerator.prepare_model(module, evaluation_mode=True)
        self.accelerator.prepare(*prepared)
        self.accelerator.register_for_checkpointing(pinning, self.ema, self.state)
        checkpoint_trained_state(self.accelerator)  # not the frozen weights

        self.clip = torch.from_numpy(np.asarray(clip_embeddings)).to(self.device, torch.float32)
        self.dataset, self.rows, self.num_workers = dataset, rows, num_workers
        self.timer = PhaseTimer(time_phases, self.device)  # per-pass wall time (benchmarks/vae_tune_step.py)

    # -- checkpoints ---------------------------------------------------------------------------------------------
    def resume(self) -> int:
        return load_newest_checkpoint(self.accelerator, self.run_dir, self.state)

    def save_checkpoint(self) -> Path:
        return save_checkpoint(self.accelerator, self.run_dir, self.state.step, self.tune["checkpoints_total_limit"])

    def stopped_at(self) -> str:
        """Where a stopped run stands: its step and last good checkpoint (listed only when a run stops)."""
        found = complete_checkpoints(self.run_dir)
        return (f"at step {self.state.step}; the last good checkpoint is "
                f"{found[-1] if found else 'none (no checkpoint yet)'}")

    # -- one step ----------------------------------------------------------------------------------------------
    def batches(self, start_step: int) -> DataLoader:
        sampler = StepBatches(self.rows, self.tune["batch_size"], self.seed, start_step,
                              self.accelerator.process_index, self.processes)
        return DataLoader(self.dataset, sampler=sampler, batch_size=None, num_workers=self.num_workers,
                          pin_memory=self.pin_memory, persistent_workers=self.num_workers > 0)

    def draw(self, latent_shape: torch.Size) -> dict[str, torch.Tensor]:
        """Every random draw of a step, for the whole global batch, from the checkpointed generator (every process
        draws them all and takes its own rows): the VAE's posterior sample, the noise and timestep both alignment
        passes share, the condition dropout."""
        generator, device, size = self.generator, self.device, self.tune["batch_size"]
        shape = (size, *latent_shape)
        return {
            "posterior": torch.randn(shape, generator=generator, device=device),
            "noise": torch.randn(shape, generator=generator, device=device),
            "timesteps": torch.randint(0, self.noise_scheduler.config.num_train_timesteps, (size,),
                                       generator=generator, device=device),
            "dropped": torch.rand(size, generator=generator, device=device) < self.unet_settings["cond_dropout"],
        }

    def _update(self, loss: torch.Tensor, params: list, optimizer, scheduler) -> float:
        """Back-propagate `loss` into `params` only, average their gradients over the processes, clip, step; the
        gradient norm before clipping."""
        self.accelerator.backward(loss, inputs=params)
        if self.processes > 1:
            self.average_gradients(params)
        grad_norm = self.accelerator.clip_grad_norm_(params, self.tune["max_grad_norm"])
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        return float(grad_norm)

    def average_gradients(self, params: list) -> None:
        """Each gradient replaced by its mean over the processes (one flat all-reduce). A parameter without a
        gradient counts as zeros, so every process reduces the same layout."""
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
        flat = self.accelerator.reduce(torch.cat([g.flatten() for g in grads]), reduction="mean")
        for param, part in zip(params, flat.split([g.numel() for g in grads])):
            param.grad = part.view_as(param).to(param.dtype)

    def global_values(self, values: dict[str, float], z: torch.Tensor) -> dict[str, float]:
        """This process's logged means as the global batch's (mean over processes: equal shares), and the per-channel
        mean and std of the global batch's latents; equal on every process, as the collapse guard needs."""
        if self.processes > 1:
            names = [name for name, value in values.items() if not name.startswith(("grad_norm", "lr_"))]
            means = self.accelerator.reduce(torch.tensor([values[n] for n in names], device=self.device,
                                                         dtype=torch.float64), reduction="mean")
            values.update(zip(names, means.tolist()))
        z = z.detach().double().transpose(0, 1).flatten(1)
        sums = self.accelerator.reduce(torch.stack([z.sum(1), (z * z).sum(1)]), reduction="sum")
        count = z.shape[1] * self.processes
        mean = sums[0] / count
        std = ((sums[1] - count * mean * mean) / (count - 1)).clamp(min=0).sqrt()
        for channel, (m, s) in enumerate(zip(mean.tolist(), std.tolist())):
            values[f"latent_mean_{channel}"], values[f"latent_std_{channel}"] = m, s
        return values

    def gather(self) -> GlobalBatch | None:
        """The sample-mode Gram's gather over the processes' rows (None on one process)."""
        return GlobalBatch(0, self.processes, None) if self.processes > 1 else None

    def step(self, batch: dict[str, torch.Tensor]) -> dict[str, float]:
        e2e, device, tune, step, share = self.e2e, self.device, self.tune, self.state.step + 1, self.share
        images = batch["image"].to(device, non_blocking=True)
        if self.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        tokens = batch["tokens"].to(device, torch.float32, non_blocking=True)
        anchor = batch["latent_mean"].to(device, torch.float32) if tune["anchor_weight"] > 0 else None
        draws = {name: draw[share] for name, draw in self.draw(batch["latent_mean"].shape[1:]).items()}
        classes = torch.where(draws["dropped"], self.null_index, batch["class_id"].to(device))
        condition = self.clip[classes]
        noise, timesteps = draws["noise"], draws["timesteps"]
        # D trains alone for its warm-up; the VAE's GAN term starts after it.
        gan_term = self.gan and step > tune["disc_warmup_steps"]

        with self.timer("vae pass"):
            with self.accelerator.autocast():
                posterior, z = e2e.encode(images, draws["posterior"])
                vae_terms = e2e.vae_terms(images, posterior, z, noise, timesteps, condition, tokens, anchor,
                                          gan=gan_term, gather=self.gather())
            values = {name: vae_terms[name].item() for name in VAE_TERMS} | {"loss_vae": vae_terms["loss"].item()}
            values["grad_norm_vae"] = self._update(vae_terms["loss"], self.vae_params, self.vae_optimizer,
                                                   self.vae_scheduler)
            values["lr_vae"] = self.vae_scheduler.get_last_lr()[0]

        if self.gan:
            with self.timer("discriminator pass"):
                with self.accelerator.autocast():
                    d_terms = e2e.discriminator_loss(images, vae_terms["reconstructions"])
                values.update(loss_d=d_terms["loss"].item(), logits_real=d_terms["logits_real"].item(),
                              logits_fake=d_terms["logits_fake"].item(), lr_d=self.d_scheduler.get_last_lr()[0])
                values["grad_norm_d"] = self._update(d_terms["loss"], self.d_params, self.d_optimizer,
                                                     self.d_scheduler)
        else:
            values.update(loss_d=float("nan"), logits_real=float("nan"), logits_fake=float("nan"),
                          lr_d=float("nan"), grad_norm_d=float("nan"))

        align_coeff = self.align_schedule(self.state.step)
        with self.timer("unet pass"):
            with self.accelerator.autocast():
                unet_terms, unet_loss = e2e.unet_terms(z, noise, timesteps, condition, tokens, align_coeff,
                                                       gather=self.gather())
            values.update(zip(["loss_unet", "loss_diff", "loss_token", "loss_manifold"], unet_terms.tolist()))
            values["grad_norm_unet"] = self._update(unet_loss, self.unet_params, self.unet_optimizer,
                                                    self.unet_scheduler)
            values.update(align_coeff=align_coeff, lr_unet=self.unet_scheduler.get_last_lr()[0])
            self.ema.step(self.unet_params)

        values = self.global_values(values, z)
        self.state.step = step
        self.check_collapse(values)
        return values

    def check_collapse(self, values: dict[str, float]) -> None:
        """Stop on a non-finite term, a VAE or U-Net that no longer gets a gradient, or latents whose spread fell
        below `collapse_std_ratio` of the frozen VAE's (REPA-E's issue #30: grad norms and the GAN term fall to 0)."""
        bad = [name for name, value in values.items() if name.startswith(("loss", "grad_norm")) and
               not np.isfinite(value) and not (name in ("loss_d", "grad_norm_d") and not self.gan)]
        if bad:
            raise FloatingPointError(f"non-finite {', '.join(bad)} {self.stopped_at()}. Lower the learning rates or "
                                     f"check the images and caches")
        for name in ("grad_norm_vae", "grad_norm_unet"):
            if values[name] == 0.0:
                raise CollapseError(f"{name} is 0 {self.stopped_at()}: that model no longer learns (REPA-E #30)")
        latent_std = torch.tensor([values[f"latent_std_{c}"] for c in range(len(self.e2e.pinning.ref_var))])
        reference = self.e2e.pinning.ref_var.sqrt().cpu().to(latent_std)
        ratio = latent_std / reference
        if bool((ratio < self.tune["collapse_std_ratio"]).any()):
            raise CollapseError(
                f"latent std per channel {[round(v, 4) for v in latent_std.tolist()]} fell below "
                f"collapse_std_ratio {self.tune['collapse_std_ratio']} of the frozen VAE's "
                f"{[round(v, 4) for v in reference.tolist()]} {self.stopped_at()}")

    # -- the run -----------------------------------------------------------------------------------------------
    def run(self) -> None:
        start, max_steps = self.resume(), self.tune["max_steps"]
        log_path = self.run_dir / "train_log.csv"
        main = self.accelerator.is_main_process
        self.run_dir.mkdir(parents=True, exist_ok=True)
        if main and log_path.exists():  # rows logged after the last checkpoint are about to be redone
            table = pd.read_csv(log_path)
            table[table["step"] <= start].to_csv(log_path, index=False)
        # Only the main process writes the step log (every process holds the same, global values).
        with open(log_path if main else os.devnull, "a", newline="") as log_file:
            writer = csv.DictWriter(log_file, fieldnames=LOG_COLUMNS)
            if main and log_file.tell() == 0:
                writer.writeheader()
            bar = progress(total=max_steps, initial=start, desc="tune_vae", unit="step", disable=not main)
            batches = iter(self.batches(start)) if start < max_steps else iter(())
            with StopSignals() as stop:
                while self.state.step < max_steps:
                    tick = time.perf_counter()
                    values = self.step(next(batches))
                    values.update(step=self.state.step, step_time=time.perf_counter() - tick)
                    writer.writerow({k: values[k] for k in LOG_COLUMNS})
                    bar.update(1)
                    bar.set_postfix(vae=f"{values['loss_vae']:.3f}", unet=f"{values['loss_unet']:.3f}",
                                    refresh=False)
                    step = self.state.step
                    stop.after_step(self.accelerator, step,
                                    step % self.tune["checkpoint_every"] == 0 or step == max_steps,
                                    lambda: log_file.flush() or self.save_checkpoint())
            bar.close()
        self.accelerator.wait_for_everyone()

    # -- artifacts ---------------------------------------------------------------------------------------------
    def ema_weights(self):
        """Temporarily swap the EMA weights into the U-Net's trainable parameters."""
        return ema_swapped(self.ema, self.unet_params)

    def save_vae(self, out_dir: Path) -> dict:
        """The tuned VAE with the normaliser folded in (a copy: training state is untouched); its record."""
        vae = copy.deepcopy(self.accelerator.unwrap_model(self.e2e.vae)).float().cpu().eval()
        fold_into_vae(vae, copy.deepcopy(self.e2e.pinning).cpu())
        if getattr(vae, "is_gradient_checkpointing", False):
            vae.disable_gradient_checkpointing()
        vae.save_pretrained(out_dir)
        return vae_record(self.vae_name, out_dir)

    def save_unet(self, out_dir: Path, vae: dict, base_unet: dict) -> None:
        export.save_weights(out_dir, self.accelerator.unwrap_model(self.e2e.model), self.noise_scheduler,
                            self.unet_settings, self.token_dim, vae, base_unet)

    def latent_stats(self) -> dict:
        pinning = self.e2e.pinning
        return {"reference_mean": pinning.ref_mean.tolist(), "reference_std": pinning.ref_var.sqrt().tolist(),
                "running_mean": pinning.running_mean.tolist(), "running_std": pinning.running_var.sqrt().tolist(),
                "momentum": pinning.momentum}


def plot_tuning_losses(log_csv: Path, out_png: Path, title: str) -> None:
    """One panel per pass: the VAE's terms, the discriminator's, the U-Net's; then the latent std per channel."""
    from .plots import _pyplot

    plt = _pyplot()
    table = pd.read_csv(log_csv)
    panels = [["loss_vae", *VAE_TERMS], ["loss_d", "logits_real", "logits_fake"],
              ["loss_unet", "loss_diff", "loss_token", "loss_manifold"], [f"latent_std_{c}" for c in range(4)]]
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.6))
    for ax, columns in zip(axes, panels):
        shown = [c for c in columns if table[c].notna().any() and table[c].abs().sum() > 0]
        for column in shown:
            ax.plot(table["step"], table[column], label=column)
        ax.set_xlabel("step")
        if shown:
            ax.legend(fontsize=7)
        else:
            ax.text(0.5, 0.5, "not computed", ha="center", va="center", transform=ax.transAxes)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(out_png, dpi=110)
    plt.close(fig)


def export_joint_model(tuned_dir: str | Path, model_dir: str | Path) -> None:
    """A run folder, as train_unet exports one, for the U-Net trained inside a tuning run (a `joint` row): its
    weights and `ema/`, one snapshot (the final EMA weights: earlier U-Nets went with earlier VAEs, which are not
    kept), the tuning's log and losses, and config.json with the final step."""
    tuned_dir, model_dir = Path(tuned_dir), Path(model_dir)
    tuning = json.loads((tuned_dir / "config.json").read_text())
    if model_dir.exists():
        shutil.rmtree(model_dir)
    export.link_tree(tuned_dir / "unet", model_dir)
    export.link_tree(tuned_dir / "unet" / "ema", model_dir / "snapshots" / f"step-{tuning['final_step']:07d}")
    shutil.copy(tuned_dir / "train_log.csv", model_dir / "train_log.csv")
    shutil.copy(tuned_dir / "losses.png", model_dir / "loss_curve.png")
    (model_dir / "config.json").write_text(json.dumps({
        "settings": tuning["unet_settings"], "seed": tuning["seed"], "joint": str(tuned_dir),
        "final_step": tuning["final_step"], "trained_rows": tuning["trained_rows"]}, indent=2))


def tune_run(caches: dict[str, str], sd15_dir: str, dinov2_path: str, vgg16: str | None, unet_settings: dict,
             tune: dict, vae_name: str, states_dir: str | Path, out_dir: str | Path, seed: int, device: torch.device,
             num_workers: int, image_size: int, dino_size: int, lpips_seed: int = 0) -> Path:
    """Check the caches (the frozen SD-1.5 VAE's latents, DINOv2 tokens, CLIP), tune (resuming if possible),
    export into `out_dir` (see the module's docstring). Returns the run's state folder. Called by every process of
    a run (`unet_settings["processes"]`, urepa.launch); the main process claims the state folder and exports."""
    from accelerate import PartialState

    from .reconstruction import load_lpips
    from .sd15 import load_noise_scheduler, load_unet
    from .vae import load_autoencoder

    state = PartialState(cpu=device.type == "cpu")  # the process group, set up by accelerate launch
    if unet_settings["processes"] != state.num_processes:
        raise ValueError(f"train.processes is {unet_settings['processes']} but this tuning run has "
                         f"{state.num_processes} process(es): start it with urepa.launch.train(..., stage='tune_vae')")
    tuning_share(tune["batch_size"], 0, state.num_processes)  # a clear error before any work
    csv_sha = file_digest(caches["csv"])
    frozen_dir = Path(sd15_dir) / "vae"
    latents = check_cache(caches["vae"], {"csv_sha256": csv_sha, "image_size": image_size})
    check_same_vae(latents.attrs["vae"], vae_record(SD15_VAE, frozen_dir), f"latent cache {caches['vae']}")
    dino = check_cache(caches["dino"], {"csv_sha256": csv_sha, "encoder_fingerprint": weights_fingerprint(dinov2_path),
                                        "view": dinov2_view(image_size, dino_size)})
    # verified whole: a full pass over the CLIP cache is a fraction of a second
    clip = check_cache(caches["clip"], {"encoder_fingerprint": weights_fingerprint(Path(sd15_dir) / "text_encoder")},
                       verify=True)
    table = pd.read_csv(caches["csv"])
    rows = rows_per_class(table, valid_rows(latents, dino), tune["images_per_class"])
    reference = cache_moments(latents["mean"], latents["std"], rows)
    lpips_model, lpips_name = load_lpips(vgg16, device, lpips_seed)
    discriminator_state = None
    if tune["disc_ckpt"]:
        discriminator_state = torch.load(tune["disc_ckpt"], map_location="cpu", weights_only=True)
    # Checkpoints hold the trained parameters only: the frozen ones are this U-Net's.
    base_unet = export.base_unet_record(sd15_dir)
    identity = {"unet_settings": without_launch(unet_settings), "tune": tune, "seed": seed, "csv_sha256": csv_sha,
                "base_unet": base_unet["fingerprint"],
                "code": training_code_digest(TUNING_CODE), "lpips": lpips_name,
                "vgg16": file_digest(vgg16) if vgg16 else None,
                "caches": {"vae": content_digest(latents), "dino": content_digest(dino), "clip": content_digest(clip)}}
    with state.main_process_first():  # the others find the folder the main process has claimed
        launch = {"processes": state.num_processes, **{key: unet_settings[key] for key in SPEED_KEYS},
                  **provenance(device, mixed_precision=unet_settings["mixed_precision"])}
        run_dir = (claim_run_state(Path(states_dir), identity, launch)
                   if state.is_main_process else run_state_dir(Path(states_dir), identity))
    tuner = VaeTuner(
        load_autoencoder(frozen_dir, device), load_unet(sd15_dir), load_noise_scheduler(sd15_dir),
        TuningRows(table["img_path"].tolist(), image_size, caches["vae"], caches["dino"],
                   table["class_id"].to_numpy()),
        rows, clip["embeddings"][:], clip.attrs["null_index"], dino.attrs["dim"], dino.attrs["grid"], reference,
        lpips_model, unet_settings, tune, run_dir, seed, device, num_workers, vae_name, discriminator_state)

    tuner.run()
    if not state.is_main_process:
        return run_dir
    out_dir = Path(out_dir)
    if out_dir.exists():
        shutil.rmtree(out_dir)
    out_dir.mkdir(parents=True)
    record = tuner.save_vae(out_dir / "vae")
    tuner.save_unet(out_dir / "unet", record, base_unet)
    with tuner.ema_weights():
        tuner.save_unet(out_dir / "unet" / "ema", record, base_unet)
    shutil.copy(run_dir / "train_log.csv", out_dir / "train_log.csv")
    plot_tuning_losses(out_dir / "train_log.csv", out_dir / "losses.png", f"tune_vae {vae_name}")
    (out_dir / "latent_stats.json").write_text(json.dumps(tuner.latent_stats(), indent=2))
    (out_dir / "config.json").write_text(json.dumps({
        "vae": vae_name, "tune": tune, "unet_settings": unet_settings, "seed": seed, "sd15_dir": str(sd15_dir),
        "dinov2": str(dinov2_path), "lpips": lpips_name, "caches": {k: str(v) for k, v in caches.items()},
        "trained_rows": int(len(rows)), "final_step": tuner.state.step, "run_state": str(run_dir)}, indent=2))
    return run_dir
