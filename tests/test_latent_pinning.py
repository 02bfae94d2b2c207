"""The latent normaliser between a VAE being tuned and the U-Net: identity at step 0, BatchNorm-like running
moments reduced over processes, moments of a latent cache, and its exact fold into the VAE's 1x1 convolutions."""
import copy

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import zarr

from urepa.generated import random_vae
from urepa.latent_pinning import MomentPinning, cache_moments, fold_into_vae

REF_MEAN = [0.8, -0.4, 0.1, 1.2]
REF_VAR = [25.0, 36.0, 16.0, 30.0]


def latents(seed: int, batch: int = 6, side: int = 8) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 4, side, side, generator=generator) * torch.tensor([3.0, 5.0, 2.0, 4.0]).view(
        1, -1, 1, 1) + torch.tensor([1.0, -2.0, 0.5, 0.0]).view(1, -1, 1, 1)


def test_identity_at_step_0_bit_for_bit():
    pinning = MomentPinning(REF_MEAN, REF_VAR)
    z = latents(0)
    assert torch.equal(pinning(z), z)
    scale, shift = pinning.scale_shift()
    assert torch.equal(scale, torch.ones(4, dtype=torch.float64)) and torch.equal(shift, torch.zeros(4).double())


def test_forward_never_moves_the_statistics_and_momentum_0_keeps_them():
    pinning = MomentPinning(REF_MEAN, REF_VAR, momentum=0.0)
    before = {name: buffer.clone() for name, buffer in pinning.named_buffers()}
    z = latents(1).requires_grad_()
    pinning(z).sum().backward()
    pinning.update(z)
    for name, buffer in pinning.named_buffers():
        assert torch.equal(buffer, before[name]), name


def test_update_follows_batchnorm_running_statistics():
    """The running moments move as torch's BatchNorm2d's do (unbiased variance, same momentum)."""
    pinning = MomentPinning(REF_MEAN, REF_VAR, momentum=0.1)
    norm = torch.nn.BatchNorm2d(4, momentum=0.1, affine=False).double()
    norm.running_mean.copy_(torch.tensor(REF_MEAN, dtype=torch.float64))
    norm.running_var.copy_(torch.tensor(REF_VAR, dtype=torch.float64))
    for seed in range(3):
        z = latents(seed)
        pinning.update(z)
        norm.train()(z.double())
    torch.testing.assert_close(pinning.running_mean, norm.running_mean, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(pinning.running_var, norm.running_var, rtol=1e-12, atol=1e-12)


def test_pinned_latents_carry_the_reference_moments():
    """With the running moments those of z (momentum 1), n(z) has the frozen VAE's mean and variance."""
    pinning = MomentPinning(REF_MEAN, REF_VAR, momentum=1.0)
    z = latents(2, batch=16).double()
    pinning.update(z)
    pinned = pinning(z).transpose(0, 1).flatten(1)
    torch.testing.assert_close(pinned.mean(1), torch.tensor(REF_MEAN).double())
    torch.testing.assert_close(pinned.var(1), torch.tensor(REF_VAR).double())


def test_bad_reference_moments_are_refused():
    with pytest.raises(ValueError, match="positive"):
        MomentPinning(REF_MEAN, [1.0, 0.0, 1.0, 1.0])
    with pytest.raises(ValueError, match="per channel"):
        MomentPinning(REF_MEAN, REF_VAR[:3])


def _update_on_two_processes(rank: int, init_file: str, batches: list[torch.Tensor], results):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        pinning = MomentPinning(REF_MEAN, REF_VAR, momentum=0.5)
        for batch in batches:
            pinning.update(batch.chunk(2)[rank])
        results[rank] = (pinning.running_mean.clone(), pinning.running_var.clone())
    finally:
        dist.destroy_process_group()


def test_statistics_do_not_depend_on_the_process_count(tmp_path):
    """Each process updates with its half of the global batch: the result is the one-process update on all of it
    (SyncBatchNorm's role in REPA-E)."""
    batches = [latents(seed, batch=8) for seed in range(2)]
    single = MomentPinning(REF_MEAN, REF_VAR, momentum=0.5)
    for batch in batches:
        single.update(batch)
    results = mp.Manager().dict()
    mp.spawn(_update_on_two_processes, args=(str(tmp_path / "init"), batches, results), nprocs=2)
    for rank in range(2):
        mean, var = results[rank]
        torch.testing.assert_close(mean, single.running_mean, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(var, single.running_var, rtol=1e-12, atol=1e-12)


def test_cache_moments_are_those_of_latents_drawn_from_the_posteriors(tmp_path):
    rng = np.random.default_rng(0)
    shape = (12, 4, 4, 4)
    means = (rng.normal(size=shape) * [[[[1.0]], [[2.0]], [[0.5]], [[3.0]]]] + 0.7).astype(np.float16)
    stds = rng.uniform(0.1, 1.5, size=shape).astype(np.float16)
    group = zarr.open_group(tmp_path / "latents.zarr", mode="w")
    group.create_array("mean", data=means, chunks=(1, 4, 4, 4))
    group.create_array("std", data=stds, chunks=(1, 4, 4, 4))
    rows = np.array([9, 1, 4, 7, 2, 11, 0, 5])  # valid rows, in no particular order
    mean, var = cache_moments(group["mean"], group["std"], rows, batch_rows=3)
    # Independent estimate: draw z = mean + std * eps many times and take the moments of the draws.
    draws = means[rows].astype(np.float64) + stds[rows].astype(np.float64) * rng.normal(size=(4000, *shape[1:]))[
        :, None]
    draws = draws.transpose(2, 0, 1, 3, 4).reshape(4, -1)
    np.testing.assert_allclose(mean, draws.mean(1), atol=0.03)
    np.testing.assert_allclose(var, draws.var(1), rtol=0.02)


def pinned_vae_pair(seed: int = 0):
    torch.manual_seed(seed)
    vae = random_vae(64, full_size=False).eval()
    pinning = MomentPinning(REF_MEAN, REF_VAR, momentum=1.0)
    pinning.update(latents(seed, batch=4))  # running moments far from the reference: a real fold
    folded = copy.deepcopy(vae)
    fold_into_vae(folded, pinning)
    return vae, folded, pinning


@torch.no_grad()
def test_the_folded_vae_encodes_to_pinned_latents():
    vae, folded, pinning = pinned_vae_pair()
    images = torch.rand(2, 3, 64, 64) * 2 - 1
    posterior, folded_posterior = vae.encode(images).latent_dist, folded.encode(images).latent_dist
    factor = vae.config.scaling_factor
    torch.testing.assert_close(folded_posterior.mean * factor, pinning(posterior.mean) * factor, rtol=0, atol=1e-5)
    scale, _ = pinning.scale_shift()
    torch.testing.assert_close(folded_posterior.std, posterior.std * scale.float().view(1, -1, 1, 1), rtol=1e-5,
                               atol=1e-6)
    assert folded.config.scaling_factor == vae.config.scaling_factor


@torch.no_grad()
def test_the_folded_vae_decodes_pinned_latents_as_the_original_decodes_raw_ones():
    vae, folded, pinning = pinned_vae_pair(1)
    z = latents(5, batch=2)
    torch.testing.assert_close(folded.decode(pinning(z)).sample, vae.decode(z).sample, rtol=1e-4, atol=1e-4)


def test_an_identity_normaliser_folds_to_the_same_weights_bit_for_bit():
    torch.manual_seed(3)
    vae = random_vae(64, full_size=False)
    folded = copy.deepcopy(vae)
    fold_into_vae(folded, MomentPinning(REF_MEAN, REF_VAR))
    for (name, value), other in zip(vae.state_dict().items(), folded.state_dict().values()):
        assert torch.equal(value, other), name


def test_a_vae_without_quant_convolutions_is_refused():
    from diffusers import AutoencoderKL

    vae = AutoencoderKL(block_out_channels=(32,), norm_num_groups=32, latent_channels=4, use_quant_conv=False,
                        use_post_quant_conv=False)
    with pytest.raises(ValueError, match="quant_conv"):
        fold_into_vae(vae, MomentPinning(REF_MEAN, REF_VAR))
