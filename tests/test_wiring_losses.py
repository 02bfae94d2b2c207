"""The loss functions' parameters, each shown to act: the cases mutation testing found unpinned by
tests/test_losses.py (per-image min-SNR weights, the default parameterisation, the lambda schedule's
edges, the manifold options in token mode and through alignment_loss, the error messages)."""
import math

import pytest
import torch
from diffusers import DDPMScheduler

from urepa.losses import AlignSchedule, alignment_loss, diffusion_loss, diffusion_target, manifold_loss


@pytest.fixture
def scheduler():
    return DDPMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")


def test_min_snr_weights_each_images_own_error(scheduler):
    """Images with different errors at different timesteps: the mean of weight_i * mse_i, not of the weights
    times the overall error. The default parameterisation is v (weights min(snr, gamma) / (snr + 1))."""
    pred = torch.zeros(2, 1, 2, 2)
    target = torch.stack([torch.full((1, 2, 2), 1.0), torch.full((1, 2, 2), 3.0)])  # mse 1 and 9
    t = torch.tensor([10, 900])
    alpha_bar = scheduler.alphas_cumprod[t].double()
    snr = alpha_bar / (1 - alpha_bar)
    errors = torch.tensor([1.0, 9.0], dtype=torch.float64)
    v_weights = torch.clamp(snr, max=5.0) / (snr + 1)
    assert diffusion_loss(pred, target, scheduler, t, snr_gamma=5.0).item() == \
        pytest.approx(float((v_weights * errors).mean()), rel=1e-5)
    eps_weights = torch.clamp(snr, max=5.0) / snr
    assert diffusion_loss(pred, target, scheduler, t, "epsilon", snr_gamma=5.0).item() == \
        pytest.approx(float((eps_weights * errors).mean()), rel=1e-5)


def test_unknown_parameterisation_is_named(scheduler):
    x = torch.zeros(1, 1, 2, 2)
    with pytest.raises(ValueError, match="prediction must be 'v' or 'epsilon', got 'x0'"):
        diffusion_target(scheduler, x, x, torch.tensor([1]), "x0")


def test_align_schedule_edges():
    # "constant" stays constant even when decay steps are configured
    assert AlignSchedule(0.8, kind="constant", decay_steps=10)(5) == 0.8
    # no decay steps: the coefficient, whatever the kind
    assert AlignSchedule(1.0, kind="cosine", decay_steps=0)(5) == 1.0
    # one decay step: the end value from the first step after warm-up on
    one = AlignSchedule(1.0, kind="linear", decay_steps=1, end=0.5)
    assert (one(0), one(1)) == (1.0, 0.5)
    # the decay counts from the end of warm-up and holds at `end` after it
    decaying = AlignSchedule(1.0, kind="linear", warmup_steps=2, decay_steps=4, end=0.0)
    assert [decaying(s) for s in (0, 1, 2, 4, 6, 20)] == pytest.approx([0.5, 1.0, 1.0, 0.5, 0.0, 0.0])
    cosine = AlignSchedule(1.0, kind="cosine", decay_steps=4, end=0.2)
    assert cosine(1) == pytest.approx(0.2 + 0.8 * 0.5 * (1 + math.cos(math.pi / 4)))
    with pytest.raises(ValueError, match="constant, cosine or linear, got 'step'"):
        AlignSchedule(1.0, kind="step", decay_steps=4)(1)


def test_manifold_options_act_in_token_mode_and_through_alignment_loss():
    generator = torch.Generator().manual_seed(0)
    pred, target = torch.randn(2, 3, 4, generator=generator), torch.randn(2, 3, 4, generator=generator)

    def by_hand(upper_only, mask_diag):
        def grams(x):
            unit = x / x.norm(dim=-1, keepdim=True)
            return unit @ unit.transpose(1, 2)

        keep = torch.ones(3, 3, dtype=torch.bool)
        if upper_only:
            keep = keep.triu()
        if mask_diag:
            keep &= ~torch.eye(3, dtype=torch.bool)
        return float(((grams(pred) - grams(target)) ** 2)[:, keep].mean())

    values = set()
    for upper_only in (False, True):
        for mask_diag in (False, True):
            expected = by_hand(upper_only, mask_diag)
            assert manifold_loss(pred, target, "token", upper_only, mask_diag).item() == pytest.approx(expected, rel=1e-5)
            _, _, through = alignment_loss({"mid": pred}, target, 3.0, "token", upper_only, mask_diag)
            assert through.item() == pytest.approx(expected, rel=1e-5)
            values.add(round(expected, 6))
    assert len(values) == 3  # symmetric Grams: mask_diag averages the same pairs with or without upper_only
