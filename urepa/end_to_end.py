"""The losses of one REPA-E step on SD-1.5 (REPA-E, part 2): the VAE tuned end to end through the alignment loss.

REPA-E's released trainer runs three backward passes, each with its own optimiser, on one batch of images:
  VAE pass   L_REG + lambda_v L_align: L1 + LPIPS + 1e-6 KL (+ 0.1 GAN) keep the VAE a VAE, and the alignment
             loss of the diffusion model's features on the VAE's latents reaches the encoder through them; the
             diffusion model, its heads and the discriminator are frozen here.
  D pass     the discriminator's hinge loss on (x, x_hat.detach()) (only when the GAN term is on).
  U-Net pass L_diff + lambda L_align on the *detached* latents: the diffusion loss never reaches the VAE (the
             stop-gradient that keeps the latent space from collapsing towards what is easy to denoise).
Both alignment passes use the same timesteps, noise and condition. Adapted to a pretrained U-Net:
  - the U-Net side is the project's own U-REPA objective (heads, layers, token + manifold terms, `Objective`);
  - the VAE side runs the U-Net only up to its deepest aligned layer and is the token loss by default (at the
    batch of 8-16 that 512 px allows, a B x B Gram is noise), the manifold term an option;
  - between VAE and U-Net sits `urepa.latent_pinning.MomentPinning` (not REPA-E's standardising BatchNorm), then
    the VAE's own latent normalisation (`scaling_factor`), so the U-Net keeps seeing SD-1.5's latent statistics;
  - an optional anchor ||mu_phi(x) - mu_phi0(x)||^2 to the frozen VAE's posterior means (read from its cache).

Each method returns loss terms with their graphs; which parameters a backward may touch is the caller's choice
(`backward(..., inputs=...)`), and the tests check each term's gradient routing with `torch.autograd.grad`.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .discriminator import generator_loss, hinge_discriminator_loss
from .latent_pinning import MomentPinning
from .losses import Objective, alignment_loss, diffusion_target
from .models import ALIGN_LAYER_MODULES, AlignedUNet, get_submodule
from .vae import LatentNormalisation


@dataclass(frozen=True)
class VaeLossWeights:
    """The VAE pass's weights. REPA-E's: L1 1, LPIPS 1, KL 1e-6, GAN 0.1 (`configs/l1_lpips_kl_gan.yaml`), and
    lambda_v 1.5 for the alignment term (`train_repae.py`); the anchor is this project's (0: off)."""

    l1: float = 1.0
    lpips: float = 1.0
    kl: float = 1e-6
    gan: float = 0.1
    align: float = 1.5
    anchor: float = 0.0
    # The VAE-side alignment: "token" (the default) or "token+manifold" (the U-Net's own mix).
    align_terms: str = "token"


class _StopForward(Exception):
    """Raised by a forward hook once the deepest aligned layer has run: nothing after it is computed."""


def deepest_aligned_module(layers: list[str]) -> str:
    """The module path of the aligned layer the U-Net's forward reaches last."""
    order = list(ALIGN_LAYER_MODULES)
    return ALIGN_LAYER_MODULES[max(layers, key=order.index)]


@contextlib.contextmanager
def forward_until(unet: nn.Module, module_path: str):
    """Within the block, a U-Net forward stops (raising `_StopForward`) right after `module_path` has run; the
    feature-capture hooks registered before this one have stored their maps by then."""
    def stop(module, inputs, output):
        raise _StopForward

    handle = get_submodule(unet, module_path).register_forward_hook(stop)
    try:
        yield
    finally:
        handle.remove()


@contextlib.contextmanager
def frozen(module: nn.Module | None, eval_mode: bool):
    """`module`'s parameters as constants of the graph built within the block (requires_grad off, restored
    after), as REPA-E freezes the diffusion model and the discriminator in the VAE pass; `eval_mode` also puts the
    module in eval mode (the diffusion model; REPA-E leaves the discriminator's BatchNorm in training mode)."""
    if module is None:
        yield
        return
    trainable = [parameter for parameter in module.parameters() if parameter.requires_grad]
    training = module.training
    for parameter in trainable:
        parameter.requires_grad_(False)
    if eval_mode:
        module.eval()
    try:
        yield
    finally:
        for parameter in trainable:
            parameter.requires_grad_(True)
        module.train(training)


class EndToEnd(nn.Module):
    """The modules one REPA-E step trains (`vae`, the U-Net with its heads `model`, the optional `discriminator`)
    and the latent normaliser between VAE and U-Net, with the loss of each pass."""

    def __init__(self, vae: nn.Module, model: AlignedUNet, pinning: MomentPinning,
                 latent_normalisation: LatentNormalisation, objective: Objective, lpips_model: nn.Module,
                 weights: VaeLossWeights, discriminator: nn.Module | None = None):
        super().__init__()
        if not model.heads:
            raise ValueError("end-to-end VAE tuning needs at least one aligned layer (train.align_layers)")
        self.vae, self.model, self.pinning, self.discriminator = vae, model, pinning, discriminator
        self.latent_normalisation, self.objective, self.weights = latent_normalisation, objective, weights
        self.lpips = lpips_model  # frozen, never trained: kept out of the state dict and the optimisers
        self.lpips.requires_grad_(False)
        self._stop_at = deepest_aligned_module(list(model.heads))

    def state_dict(self, *args, **kwargs):
        return {k: v for k, v in super().state_dict(*args, **kwargs).items() if not k.startswith("lpips.")}

    def encode(self, images: torch.Tensor, posterior_noise: torch.Tensor):
        """The posterior of `images` and its sample z = mean + std * noise (raw: before any normalisation)."""
        posterior = self.vae.encode(images).latent_dist
        return posterior, posterior.mean + posterior.std * posterior_noise

    def unet_latents(self, z: torch.Tensor) -> torch.Tensor:
        """What the U-Net reads: the pinned latents, then the VAE's latent normalisation (SD's * 0.18215)."""
        return self.latent_normalisation.normalise(self.pinning(z))

    def vae_terms(self, images: torch.Tensor, posterior, z: torch.Tensor, noise: torch.Tensor,
                  timesteps: torch.Tensor, encoder_hidden_states: torch.Tensor, target_tokens: torch.Tensor,
                  anchor_mean: torch.Tensor | None = None, gan: bool = False, gather=None) -> dict[str, torch.Tensor]:
        """The VAE pass's terms (unweighted) and `loss`, their weighted sum. Images and reconstructions in [-1, 1];
        L1 on [0, 1] as REPA-E computes it; KL summed over latent elements, averaged over images. `gather`: the
        sample-mode Gram's, on several processes (urepa.batches.GlobalBatch)."""
        weights = self.weights
        reconstructions = self.vae.decode(z).sample
        terms = {"l1": F.l1_loss(reconstructions.float(), images.float()) / 2,
                 "lpips": self.lpips(reconstructions.float(), images.float()).mean(),
                 "kl": posterior.kl().sum() / len(images)}
        with frozen(self.model, eval_mode=True):
            terms["align"] = self.vae_alignment(z, noise, timesteps, encoder_hidden_states, target_tokens, gather)
        with frozen(self.discriminator, eval_mode=False):
            terms["gan"] = (generator_loss(self.discriminator((reconstructions.float() + 1) / 2)) if gan
                            else torch.zeros((), device=images.device))
        terms["anchor"] = (F.mse_loss(posterior.mean.float(), anchor_mean.float()) if anchor_mean is not None
                           else torch.zeros((), device=images.device))
        terms["loss"] = sum(getattr(weights, name) * terms[name]
                            for name in ("l1", "lpips", "kl", "gan", "align", "anchor"))
        terms["reconstructions"] = reconstructions
        return terms

    def vae_alignment(self, z: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor,
                      encoder_hidden_states: torch.Tensor, target_tokens: torch.Tensor, gather=None) -> torch.Tensor:
        """The alignment loss of the U-Net's features on the VAE's latents, with the U-Net stopped after its
        deepest aligned layer: the token loss, plus the manifold term with `align_terms: token+manifold`."""
        latents = self.unet_latents(z)
        noisy = self.objective.noise_scheduler.add_noise(latents, noise, timesteps)
        with forward_until(self.model.unet, self._stop_at), contextlib.suppress(_StopForward):
            self.model.unet(noisy, timesteps, encoder_hidden_states=encoder_hidden_states)
        features = self.model.capture.pop()
        pred_tokens = {layer: head(features[layer]) for layer, head in self.model.heads.items()}
        manifold = self.objective.manifold_coeff if self.weights.align_terms == "token+manifold" else 0.0
        loss, loss_token, _ = alignment_loss(pred_tokens, target_tokens, manifold, self.objective.manifold_mode,
                                             self.objective.upper_only, self.objective.mask_diag, gather,
                                             self.objective.target_spatial_norm)
        return loss if manifold else loss_token

    def discriminator_loss(self, images: torch.Tensor, reconstructions: torch.Tensor) -> dict[str, torch.Tensor]:
        """The D pass: hinge loss on real images and detached reconstructions, both mapped to [0, 1]."""
        logits_real = self.discriminator((images.float() + 1) / 2)
        logits_fake = self.discriminator((reconstructions.detach().float() + 1) / 2)
        return {"loss": hinge_discriminator_loss(logits_real, logits_fake),
                "logits_real": logits_real.detach().mean(), "logits_fake": logits_fake.detach().mean()}

    def unet_terms(self, z: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor,
                   encoder_hidden_states: torch.Tensor, target_tokens: torch.Tensor, align_coeff: float,
                   update_statistics: bool = True, gather=None) -> tuple[torch.Tensor, torch.Tensor]:
        """The U-Net pass on the detached latents: `Objective`'s (terms, loss). The normaliser pins with the
        statistics the VAE pass used, then (`update_statistics`) moves them towards this batch's."""
        z = z.detach()
        latents = self.unet_latents(z)
        if update_statistics:
            self.pinning.update(z)
        noisy = self.objective.noise_scheduler.add_noise(latents, noise, timesteps)
        target = diffusion_target(self.objective.noise_scheduler, latents, noise, timesteps, self.objective.prediction)
        prediction, pred_tokens = self.model(noisy, timesteps, encoder_hidden_states)
        return self.objective(prediction, target, timesteps, pred_tokens, target_tokens, align_coeff, gather=gather)
