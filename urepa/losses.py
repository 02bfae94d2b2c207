"""The U-REPA objective, L = L_diff + lambda * (L_token + w * L_manifold): its terms, and `Objective`, the one
place they are summed into the loss a step back-propagates.

Tokens are [B, N, D]; the U-Net side comes from `AlignHead`, the target side from the DINOv2 cache.
"""
from __future__ import annotations

import contextlib
import functools
import math
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F


def token_loss(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean over images and tokens of 1 - cos(pred token, target token)."""
    return (1 - F.cosine_similarity(pred.float(), target.float(), dim=-1)).mean()


def _masked_mse(gram_pred: torch.Tensor, gram_target: torch.Tensor, upper_only: bool, mask_diag: bool) -> torch.Tensor:
    n = gram_pred.shape[-1]
    mask = torch.ones(n, n, dtype=torch.bool, device=gram_pred.device)
    if upper_only:  # the Gram matrices are symmetric: the upper triangle holds every pair once
        mask = mask.triu()
    if mask_diag:  # self-similarity is 1 on both sides for normalised vectors: no signal
        mask.fill_diagonal_(False)
    return ((gram_pred - gram_target) ** 2)[..., mask].mean()


def spatial_normalise(tokens: torch.Tensor, alpha: float) -> torch.Tensor:
    """iREPA's spatial normalisation of the teacher's tokens, [B, N, D] -> [B, N, D]: per image and channel,
    subtract alpha times the channel's mean over the N tokens, then divide by its standard deviation over them
    (unbiased, as torch's `std`) plus 1e-6. alpha = 1 is a z-score over the image; at alpha < 1 part of the image's
    global mean stays. It takes the component every token shares out of the target, so that the tokens' spatial
    contrast is what the head is aligned to (Singh et al. 2025, "What matters for representation alignment: global
    information or spatial structure?", arXiv 2512.10794; read from End2End-Diffusion/iREPA, ldm/utils.py
    `spatial_zscore`, default alpha 0.6 in ldm/train.py `--zscore-alpha`; SimpleTuner's
    `irepa_spatial_norm_alpha`, simpletuner/helpers/training/crepa.py, normalises the targets of U-REPA's token
    and manifold terms alike, as here)."""
    tokens = tokens.float()
    return (tokens - alpha * tokens.mean(dim=1, keepdim=True)) / (tokens.std(dim=1, keepdim=True) + 1e-6)


def pooled_samples(tokens: torch.Tensor) -> torch.Tensor:
    """Each image's tokens mean-pooled and L2-normalised, [B, N, D] -> [B, D]: the rows of the sample-mode Gram."""
    return F.normalize(tokens.float().mean(dim=1), dim=-1)


def manifold_loss(pred: torch.Tensor, target: torch.Tensor, mode: str = "sample", upper_only: bool = False,
                  mask_diag: bool = False, gather=None) -> torch.Tensor:
    """MSE between the similarity structures of the two token sets.

    mode="sample": mean-pool each image's tokens, L2-normalise, compare the B x B Gram matrices
        (relations between images; the original plan's form, O(B^2)).
    mode="token": per image, compare the N x N Gram matrices of the L2-normalised tokens
        (relations between patches; the form SimpleTuner uses).
    gather (mode="sample"): maps this part's pooled rows (pred, target), [b, D] each, to the whole batch's
        [B, D] when the batch is split across processes or micro-batches, so that the Gram is the global
        batch's (urepa.batches.GlobalBatch); the pred rows keep their gradient.
    """
    pred, target = pred.float(), target.float()
    if mode == "sample":
        p, t = pooled_samples(pred), pooled_samples(target)
        if gather is not None:
            p, t = gather(p, t)
        return _masked_mse(p @ p.T, t @ t.T, upper_only, mask_diag)
    if mode == "token":
        p, t = F.normalize(pred, dim=-1), F.normalize(target, dim=-1)
        return _masked_mse(p @ p.transpose(1, 2), t @ t.transpose(1, 2), upper_only, mask_diag)
    raise ValueError(f"manifold mode must be 'sample' or 'token', got {mode!r}")


def diffusion_target(scheduler, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor,
                     prediction: str) -> torch.Tensor:
    """What the U-Net regresses under the model's own DDPM schedule: the noise, or
    v = sqrt(alpha_bar_t) * noise - sqrt(1 - alpha_bar_t) * x0."""
    if prediction == "epsilon":
        return noise
    if prediction == "v":
        return scheduler.get_velocity(latents, noise, timesteps)
    raise ValueError(f"prediction must be 'v' or 'epsilon', got {prediction!r}")


def diffusion_loss(model_pred: torch.Tensor, target: torch.Tensor, scheduler=None, timesteps=None,
                   prediction: str = "epsilon", snr_gamma: float | None = None) -> torch.Tensor:
    """MSE to the target; with `snr_gamma`, min-SNR-gamma weighting per image (Hang et al. 2023)."""
    if snr_gamma is None:
        return F.mse_loss(model_pred.float(), target.float())
    from diffusers.training_utils import compute_snr

    snr = compute_snr(scheduler, timesteps)
    weights = torch.clamp(snr, max=snr_gamma) / (snr + 1 if prediction == "v" else snr)
    per_image = F.mse_loss(model_pred.float(), target.float(), reduction="none").mean(dim=(1, 2, 3))
    return (per_image * weights).mean()


@dataclass
class AlignSchedule:
    """lambda over training steps, as SimpleTuner offers for U-REPA: linear warm-up from 0, then
    constant, or a cosine/linear decay towards `end` over `decay_steps`; 0 from `cutoff_step` on."""

    coeff: float
    kind: str = "constant"
    warmup_steps: int = 0
    decay_steps: int = 0
    end: float = 0.0
    cutoff_step: int | None = None

    def __call__(self, step: int) -> float:
        if self.cutoff_step is not None and step >= self.cutoff_step:
            return 0.0
        if step < self.warmup_steps:
            return self.coeff * (step + 1) / self.warmup_steps
        if self.kind == "constant" or self.decay_steps <= 0:
            return self.coeff
        progress = min(1.0, (step - self.warmup_steps) / self.decay_steps)
        if self.kind == "cosine":
            shape = 0.5 * (1 + math.cos(math.pi * progress))
        elif self.kind == "linear":
            shape = 1 - progress
        else:
            raise ValueError(f"align schedule kind must be constant, cosine or linear, got {self.kind!r}")
        return self.end + (self.coeff - self.end) * shape


def alignment_loss(pred_tokens: dict[str, torch.Tensor], target_tokens: torch.Tensor, manifold_coeff: float,
                   manifold_mode: str = "sample", upper_only: bool = False, mask_diag: bool = False,
                   gather=None, target_spatial_norm: float | None = None
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(L_token + w * L_manifold, L_token, L_manifold), each averaged over the aligned layers.
    `gather(layer, pred_rows, target_rows)`: manifold_loss's `gather`, per aligned layer.
    `target_spatial_norm` (alpha): both terms' targets are `spatial_normalise`d first (iREPA)."""
    if target_spatial_norm is not None:
        target_tokens = spatial_normalise(target_tokens, target_spatial_norm)
    token_terms = [token_loss(tokens, target_tokens) for tokens in pred_tokens.values()]
    manifold_terms = [manifold_loss(tokens, target_tokens, manifold_mode, upper_only, mask_diag,
                                    functools.partial(gather, layer) if gather else None)
                      for layer, tokens in pred_tokens.items()]
    loss_token = torch.stack(token_terms).mean()
    loss_manifold = torch.stack(manifold_terms).mean()
    return loss_token + manifold_coeff * loss_manifold, loss_token, loss_manifold


@dataclass
class Objective:
    """L = L_diff + lambda * (L_token + w * L_manifold) of one (micro-)batch, from the training settings' terms.

    Returns the logged terms (L, L_diff, L_token, L_manifold; NaN alignment terms without aligned tokens) and the
    loss to back-propagate, scaled so that `accumulate` micro-batches add up to the global batch's gradient.
    With a `gather` that knows the other micro-batches' pooled rows (urepa.batches.GlobalBatch), the manifold
    term is already the global batch's: it is not divided, and this backward carries only this micro-batch's
    rows of its gradient."""

    noise_scheduler: object
    prediction: str
    snr_gamma: float | None
    manifold_coeff: float
    manifold_mode: str = "sample"
    upper_only: bool = False
    mask_diag: bool = False
    # a phase timer (urepa.train.PhaseTimer): the alignment terms are charged to "alignment"
    timer: Callable[[str], contextlib.AbstractContextManager] | None = None
    # alpha of iREPA's spatial normalisation of the target tokens (`spatial_normalise`); None: the tokens as cached
    target_spatial_norm: float | None = None

    @classmethod
    def from_settings(cls, noise_scheduler, settings: dict, timer=None) -> "Objective":
        return cls(noise_scheduler, settings["prediction"], settings["snr_gamma"], settings["manifold_coeff"],
                   settings["manifold_mode"], settings["manifold_upper_only"], settings["manifold_mask_diag"], timer,
                   settings["target_spatial_norm"])

    def __call__(self, model_pred: torch.Tensor, target: torch.Tensor, timesteps: torch.Tensor,
                 pred_tokens: dict[str, torch.Tensor], target_tokens: torch.Tensor, align_coeff: float,
                 accumulate: int = 1, gather=None) -> tuple[torch.Tensor, torch.Tensor]:
        loss_diff = diffusion_loss(model_pred, target, self.noise_scheduler, timesteps, self.prediction,
                                   self.snr_gamma)
        if not pred_tokens:
            nan = torch.full((), float("nan"), device=loss_diff.device)
            return torch.stack([loss_diff, loss_diff, nan, nan]).detach(), loss_diff / accumulate
        with self.timer("alignment") if self.timer else contextlib.nullcontext():
            loss_align, loss_token, loss_manifold = alignment_loss(
                pred_tokens, target_tokens, self.manifold_coeff, self.manifold_mode, self.upper_only, self.mask_diag,
                gather, self.target_spatial_norm)
        loss = loss_diff + align_coeff * loss_align
        terms = torch.stack([loss, loss_diff, loss_token, loss_manifold]).detach()
        if gather is not None and gather.known is not None:
            # Micro-batch means add up to the global mean divided by `accumulate`; the Gram term is already the
            # global batch's.
            return terms, (loss_diff + align_coeff * loss_token) / accumulate + \
                align_coeff * self.manifold_coeff * loss_manifold
        return terms, loss / accumulate
