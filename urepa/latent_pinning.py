"""REPA-E's latent normaliser, adapted to a pretrained U-Net (REPA-E, part 2).

REPA-E puts an affine-free BatchNorm between the VAE and a SiT trained from scratch: it standardises every latent
channel. SD-1.5's U-Net was trained on SD-VAE latents with their own channel means and spreads, so here the
normaliser pins the moments instead: n(z) = (z - m) / s * s_ref + m_ref, with m, s the running per-channel
moments of the tuned VAE's raw latents and m_ref, s_ref those of the frozen VAE, read from its latent cache.
At step 0 (m, s) = (m_ref, s_ref) and n is exactly the identity; the U-Net keeps seeing SD-1.5's latent statistics
however the VAE drifts. At export n is folded into the VAE's `quant_conv` (its inverse into `post_quant_conv`), so
the tuned VAE keeps `scaling_factor` 0.18215 and loads unchanged in a stock pipeline and in `urepa.caches`.

The moments are kept as variances, so the scale sqrt(var_ref / var) is exactly 1 while they are equal.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.distributed as dist
import zarr
from tqdm import tqdm


class MomentPinning(torch.nn.Module):
    """n(z) = (z - m) / s * s_ref + m_ref per channel of raw [B, C, H, W] latents. `forward` never changes the
    statistics (the VAE pass uses it as it is); `update` moves the running moments towards a batch's, reduced over
    every process, as BatchNorm's running statistics do (momentum 0 keeps them)."""

    def __init__(self, ref_mean, ref_var, momentum: float = 0.1):
        super().__init__()
        ref_mean = torch.as_tensor(ref_mean, dtype=torch.float64)
        ref_var = torch.as_tensor(ref_var, dtype=torch.float64)
        if ref_mean.shape != ref_var.shape or ref_mean.ndim != 1:
            raise ValueError(f"reference moments must be two vectors of one length per channel, got "
                             f"{tuple(ref_mean.shape)} and {tuple(ref_var.shape)}")
        if not (ref_var > 0).all():
            raise ValueError(f"reference variances must be positive, got {ref_var.tolist()}")
        self.momentum = momentum
        # float64: a long run adds momentum-weighted batch moments millions of times.
        self.register_buffer("ref_mean", ref_mean)
        self.register_buffer("ref_var", ref_var)
        self.register_buffer("running_mean", ref_mean.clone())
        self.register_buffer("running_var", ref_var.clone())

    def scale_shift(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(a, b) with n(z) = a z + b, per channel, in float64."""
        scale = torch.sqrt(self.ref_var / self.running_var)
        return scale, self.ref_mean - self.running_mean * scale

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        scale, shift = self.scale_shift()
        return z * scale.to(z.dtype).view(1, -1, 1, 1) + shift.to(z.dtype).view(1, -1, 1, 1)

    @torch.no_grad()
    def update(self, z: torch.Tensor) -> None:
        """Move the running moments towards those of `z` (this process's rows of the global batch): the sums are
        reduced across processes first, so the statistics do not depend on the process count."""
        z = z.detach().double().transpose(0, 1).flatten(1)
        sums = torch.stack([z.sum(1), (z * z).sum(1), torch.full_like(z[:, 0], z.shape[1])])
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(sums)
        total, squares, count = sums
        mean = total / count
        # Unbiased, as BatchNorm keeps its running variance.
        var = (squares - count * mean * mean) / (count - 1)
        self.running_mean.mul_(1 - self.momentum).add_(self.momentum * mean)
        self.running_var.mul_(1 - self.momentum).add_(self.momentum * var)

    def extra_repr(self) -> str:
        return f"channels={self.ref_mean.numel()}, momentum={self.momentum}"


def cache_moments(mean: zarr.Array, std: zarr.Array, rows: np.ndarray, batch_rows: int = 256
                  ) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel mean and variance of z ~ N(mean, std^2) over `rows` of a latent cache (its `mean` and `std`
    arrays, [rows, C, H, W]): E[z] = E[mean], Var[z] = E[std^2] + E[mean^2] - E[z]^2, over rows and pixels."""
    channels = mean.shape[1]
    totals = np.zeros((3, channels), dtype=np.float64)
    for start in tqdm(range(0, len(rows), batch_rows), desc="latent moments", unit="batch", leave=False):
        chunk = np.sort(rows[start:start + batch_rows])
        means = mean.get_orthogonal_selection((chunk,)).astype(np.float64)
        stds = std.get_orthogonal_selection((chunk,)).astype(np.float64)
        totals += [means.sum((0, 2, 3)), (means * means).sum((0, 2, 3)), (stds * stds).sum((0, 2, 3))]
    count = len(rows) * mean.shape[2] * mean.shape[3]
    if count == 0:
        raise ValueError("no valid rows to take the latent moments from")
    first, second_of_means, second_of_noise = totals / count
    return first, second_of_noise + second_of_means - first * first


@torch.no_grad()
def fold_into_vae(vae, pinning: MomentPinning) -> None:
    """Make `vae` (a diffusers AutoencoderKL) encode to n(z) and decode n(z) as it decoded z, in place: the
    posterior mean rows of `quant_conv` are scaled by a and shifted by b, its log-variance bias gains 2 log a
    (so the std scales by a and a sample z' = a z + b), and `post_quant_conv` first undoes n. Computed in float64."""
    quant, post_quant = vae.quant_conv, vae.post_quant_conv
    if quant is None or post_quant is None or quant.kernel_size != (1, 1) or post_quant.kernel_size != (1, 1):
        raise ValueError("folding the latent normaliser needs the VAE's 1x1 quant_conv and post_quant_conv "
                         "(use_quant_conv and use_post_quant_conv, as SD-1.5's VAE has)")
    scale, shift = pinning.scale_shift()
    channels = scale.numel()

    def set_(param, value):
        param.copy_(value.to(param.dtype))

    weight, bias = quant.weight.double(), quant.bias.double()
    set_(quant.weight[:channels], weight[:channels] * scale.view(-1, 1, 1, 1))
    set_(quant.bias[:channels], bias[:channels] * scale + shift)
    set_(quant.bias[channels:], bias[channels:] + 2 * torch.log(scale))
    # post_quant(z) = W z + c with z = (z' - b) / a: W' = W / a per input channel, c' = c - W (b / a).
    weight, bias = post_quant.weight.double(), post_quant.bias.double()
    set_(post_quant.bias, bias - weight[:, :, 0, 0] @ (shift / scale))
    set_(post_quant.weight, weight / scale.view(1, -1, 1, 1))
