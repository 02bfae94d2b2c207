"""The U-REPA loss terms (urepa.losses) against hand-computed values; and each parameter shown to act (the cases
mutation testing found unpinned: per-image min-SNR weights, the default parameterisation, the lambda schedule's
edges, the manifold options in token mode and through alignment_loss, the error messages)."""
import contextlib
import functools
import math

import pytest
import torch
from diffusers import DDPMScheduler

from urepa.losses import (AlignSchedule, Objective, alignment_loss, diffusion_loss, diffusion_target, manifold_loss,
                          spatial_normalise, token_loss)


def unit(*v):
    t = torch.tensor(v, dtype=torch.float32)
    return t / t.norm()


def test_token_loss_is_mean_of_one_minus_cosine():
    pred = torch.stack([torch.stack([unit(1, 0), unit(0, 1)])])          # [1, 2, 2]
    target = torch.stack([torch.stack([unit(1, 0), unit(1, 1)])])
    # cosines: 1 and 1/sqrt(2)
    expected = ((1 - 1) + (1 - 1 / math.sqrt(2))) / 2
    assert token_loss(pred, target).item() == pytest.approx(expected, abs=1e-6)


def test_token_loss_is_scale_invariant_and_zero_for_identical_tokens():
    x = torch.randn(3, 5, 8)
    assert token_loss(x, x).item() == pytest.approx(0, abs=1e-6)
    assert token_loss(2 * x, x).item() == pytest.approx(0, abs=1e-6)


def test_manifold_sample_mode_matches_hand_computed_gram_mse():
    # two images, one token each: pooled vectors are the tokens themselves
    pred = torch.stack([unit(1, 0)[None], unit(0, 1)[None]])      # Gram: [[1,0],[0,1]]
    target = torch.stack([unit(1, 0)[None], unit(1, 1)[None]])    # Gram: [[1,c],[c,1]], c = 1/sqrt2
    c = 1 / math.sqrt(2)
    assert manifold_loss(pred, target, "sample").item() == pytest.approx(2 * c**2 / 4, abs=1e-6)
    assert manifold_loss(pred, target, "sample", upper_only=True).item() == pytest.approx(c**2 / 3, abs=1e-6)
    assert manifold_loss(pred, target, "sample", mask_diag=True).item() == pytest.approx(c**2, abs=1e-6)
    assert manifold_loss(pred, target, "sample", upper_only=True, mask_diag=True).item() == pytest.approx(c**2, abs=1e-6)


def test_manifold_sample_mode_pools_tokens_before_the_gram():
    pred = torch.tensor([[[1.0, 0.0], [0.0, 1.0]], [[1.0, 0.0], [1.0, 0.0]]])  # pooled: (.5,.5) and (1,0)
    target = torch.tensor([[[1.0, 0.0], [1.0, 0.0]], [[1.0, 0.0], [1.0, 0.0]]])  # pooled: both (1,0)
    # normalised pooled pred: u=(1,1)/sqrt2, v=(1,0): off-diagonal cos = 1/sqrt2; target off-diagonal = 1
    off = (1 / math.sqrt(2) - 1) ** 2
    assert manifold_loss(pred, target, "sample").item() == pytest.approx(2 * off / 4, abs=1e-6)


def test_manifold_token_mode_matches_hand_computed_per_image_gram_mse():
    pred = torch.stack([torch.stack([unit(1, 0), unit(0, 1)]), torch.stack([unit(1, 0), unit(1, 0)])])
    target = torch.stack([torch.stack([unit(1, 0), unit(1, 1)]), torch.stack([unit(1, 0), unit(1, 0)])])
    c = 1 / math.sqrt(2)
    # image 0: off-diagonals differ by c (twice); image 1: identical. Mean over 2 * 4 entries.
    assert manifold_loss(pred, target, "token").item() == pytest.approx(2 * c**2 / 8, abs=1e-6)
    assert manifold_loss(pred, target, "token", mask_diag=True).item() == pytest.approx(2 * c**2 / 4, abs=1e-6)


def test_manifold_loss_rejects_unknown_mode():
    with pytest.raises(ValueError, match="sample.*token"):
        manifold_loss(torch.randn(2, 3, 4), torch.randn(2, 3, 4), mode="pairs")


@pytest.fixture
def scheduler():
    return DDPMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")


def test_v_target_matches_the_definition_on_the_ddpm_schedule(scheduler):
    x0, noise = torch.randn(3, 4, 8, 8), torch.randn(3, 4, 8, 8)
    t = torch.tensor([0, 500, 999])
    alpha_bar = scheduler.alphas_cumprod[t].view(-1, 1, 1, 1)
    expected = alpha_bar.sqrt() * noise - (1 - alpha_bar).sqrt() * x0
    torch.testing.assert_close(diffusion_target(scheduler, x0, noise, t, "v"), expected)
    # scaled_linear betas: beta_t = (linspace(sqrt(b0), sqrt(b1), T) ** 2)
    betas = torch.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=torch.float64) ** 2
    assert float(alpha_bar[1]) == pytest.approx(float(torch.prod(1 - betas[:501])), rel=1e-5)


def test_epsilon_target_is_the_noise(scheduler):
    x0, noise = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8)
    assert torch.equal(diffusion_target(scheduler, x0, noise, torch.tensor([3, 7]), "epsilon"), noise)


def test_min_snr_weighting_matches_hand_computation(scheduler):
    pred, target = torch.zeros(2, 1, 2, 2), torch.ones(2, 1, 2, 2)
    t = torch.tensor([10, 900])
    alpha_bar = scheduler.alphas_cumprod[t]
    snr = alpha_bar / (1 - alpha_bar)
    for prediction, denominator in (("epsilon", snr), ("v", snr + 1)):
        expected = (torch.clamp(snr, max=5.0) / denominator).mean()
        got = diffusion_loss(pred, target, scheduler, t, prediction, snr_gamma=5.0)
        assert got.item() == pytest.approx(expected.item(), rel=1e-5)
    assert diffusion_loss(pred, target).item() == pytest.approx(1.0)


def test_alignment_loss_averages_layers_and_weights_the_manifold_term():
    target = torch.nn.functional.normalize(torch.randn(4, 6, 8), dim=-1)
    a, b = torch.nn.functional.normalize(torch.randn(4, 6, 8), dim=-1), target.clone()
    total, tok, man = alignment_loss({"mid": a, "dec_first": b}, target, manifold_coeff=3.0)
    assert tok.item() == pytest.approx(token_loss(a, target).item() / 2, abs=1e-6)
    assert man.item() == pytest.approx(manifold_loss(a, target).item() / 2, abs=1e-6)
    assert total.item() == pytest.approx(tok.item() + 3.0 * man.item(), abs=1e-6)


def test_align_schedule_warmup_decay_and_cutoff():
    constant = AlignSchedule(0.8)
    assert constant(0) == constant(10_000) == 0.8
    warm = AlignSchedule(0.8, warmup_steps=4)
    assert [warm(s) for s in range(5)] == pytest.approx([0.2, 0.4, 0.6, 0.8, 0.8])
    cosine = AlignSchedule(1.0, kind="cosine", decay_steps=100, end=0.0)
    assert cosine(0) == pytest.approx(1.0) and cosine(50) == pytest.approx(0.5) and cosine(100) == pytest.approx(0.0)
    linear = AlignSchedule(1.0, kind="linear", decay_steps=10, end=0.5)
    assert linear(5) == pytest.approx(0.75)
    assert AlignSchedule(0.8, cutoff_step=100)(100) == 0.0


def test_a_cutoff_leaves_lambda_zero_from_that_step_to_the_end():
    """HASTE's termination: lambda as set before the cutoff step, 0 at it and at every step after, also where a
    warm-up or decay would still be under way."""
    steps = range(120)
    haste = AlignSchedule(0.8, cutoff_step=60)
    assert [haste(s) for s in steps] == [0.8] * 60 + [0.0] * 60
    decaying = AlignSchedule(1.0, kind="linear", warmup_steps=10, decay_steps=100, end=0.5, cutoff_step=30)
    assert decaying(29) == pytest.approx(1 - 0.5 * 19 / 100) and all(decaying(s) == 0.0 for s in range(30, 120))


# -- iREPA's spatial normalisation of the targets ----------------------------------------------------------------


def test_spatial_normalisation_matches_a_hand_computation():
    """One image, three tokens, two channels. Channel 0 holds 1, 2, 3: mean 2, unbiased std 1, so with alpha 0.6
    (x - 1.2) / (1 + 1e-6). Channel 1 holds 0, 0, 6: mean 2, unbiased std sqrt((4 + 4 + 16) / 2) = sqrt(12)."""
    tokens = torch.tensor([[[1.0, 0.0], [2.0, 0.0], [3.0, 6.0]]])
    expected = torch.tensor([[[-0.2 / (1 + 1e-6), -1.2 / (math.sqrt(12) + 1e-6)],
                              [0.8 / (1 + 1e-6), -1.2 / (math.sqrt(12) + 1e-6)],
                              [1.8 / (1 + 1e-6), 4.8 / (math.sqrt(12) + 1e-6)]]])
    torch.testing.assert_close(spatial_normalise(tokens, 0.6), expected)
    # alpha = 1 is a z-score over the image's tokens: zero mean and unit (unbiased) std per image and channel
    z = spatial_normalise(torch.randn(3, 16, 5), 1.0)
    torch.testing.assert_close(z.mean(dim=1), torch.zeros(3, 5), atol=1e-6, rtol=0)
    torch.testing.assert_close(z.std(dim=1), torch.ones(3, 5), atol=1e-5, rtol=0)
    # each image is normalised over its own tokens, not the batch's
    pair = torch.stack([tokens[0], 10 * tokens[0] + 3])
    torch.testing.assert_close(spatial_normalise(pair, 1.0)[1], spatial_normalise(pair, 1.0)[0], atol=1e-5, rtol=0)


def spatially_normalised_by_hand(tokens: torch.Tensor, alpha: float) -> torch.Tensor:
    """The formula of iREPA written out: sums over the token axis for the mean and the (n - 1) variance."""
    n = tokens.shape[1]
    mean = tokens.sum(dim=1, keepdim=True) / n
    std = (((tokens - mean) ** 2).sum(dim=1, keepdim=True) / (n - 1)).sqrt()
    return (tokens - alpha * mean) / (std + 1e-6)


@pytest.mark.parametrize("mode", ["sample", "token"])
def test_alignment_loss_normalises_the_targets_of_both_terms(mode):
    generator = torch.Generator().manual_seed(3)
    pred = {"mid": torch.randn(4, 6, 8, generator=generator)}
    target = torch.nn.functional.normalize(torch.randn(4, 6, 8, generator=generator) + 0.5, dim=-1)
    normalised = spatially_normalised_by_hand(target, 0.6)
    total, tok, man = alignment_loss(pred, target, 3.0, mode, target_spatial_norm=0.6)
    torch.testing.assert_close(tok, token_loss(pred["mid"], normalised), rtol=1e-5, atol=0)
    torch.testing.assert_close(man, manifold_loss(pred["mid"], normalised, mode), rtol=1e-5, atol=0)
    _, plain_tok, _ = alignment_loss(pred, target, 3.0, mode)
    assert plain_tok.item() != pytest.approx(tok.item(), rel=1e-3)  # the option acts


# -- each parameter acts -------------------------------------------------------------------------------


def test_min_snr_weights_each_images_own_error(scheduler):
    """Images with different errors at different timesteps: the mean of weight_i * mse_i, not of the weights
    times the overall error. The default parameterisation is epsilon (weights min(snr, gamma) / snr); v weighs
    min(snr, gamma) / (snr + 1)."""
    pred = torch.zeros(2, 1, 2, 2)
    target = torch.stack([torch.full((1, 2, 2), 1.0), torch.full((1, 2, 2), 3.0)])  # mse 1 and 9
    t = torch.tensor([10, 900])
    alpha_bar = scheduler.alphas_cumprod[t].double()
    snr = alpha_bar / (1 - alpha_bar)
    errors = torch.tensor([1.0, 9.0], dtype=torch.float64)
    eps_weights = torch.clamp(snr, max=5.0) / snr
    assert diffusion_loss(pred, target, scheduler, t, snr_gamma=5.0).item() == \
        pytest.approx(float((eps_weights * errors).mean()), rel=1e-5)
    v_weights = torch.clamp(snr, max=5.0) / (snr + 1)
    assert diffusion_loss(pred, target, scheduler, t, "v", snr_gamma=5.0).item() == \
        pytest.approx(float((v_weights * errors).mean()), rel=1e-5)


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


# -- the whole objective ----------------------------------------------------------------------------------------
def objective_inputs(seed: int = 0) -> dict:
    generator = torch.Generator().manual_seed(seed)
    return {"model_pred": torch.randn(4, 2, 3, 3, generator=generator),
            "target": torch.randn(4, 2, 3, 3, generator=generator),
            "timesteps": torch.tensor([5, 200, 600, 990]),
            "pred_tokens": {"mid": torch.randn(4, 6, 8, generator=generator),
                            "dec_first": torch.randn(4, 6, 8, generator=generator)},
            "target_tokens": torch.randn(4, 6, 8, generator=generator)}


def by_hand(inputs: dict, scheduler, prediction: str, snr_gamma, mode: str, upper_only: bool, mask_diag: bool):
    """L_diff and the per-layer-averaged L_token and L_manifold, from the single-term functions."""
    loss_diff = diffusion_loss(inputs["model_pred"], inputs["target"], scheduler, inputs["timesteps"], prediction,
                               snr_gamma)
    layers = inputs["pred_tokens"].values()
    loss_token = sum(token_loss(p, inputs["target_tokens"]) for p in layers) / len(layers)
    loss_manifold = sum(manifold_loss(p, inputs["target_tokens"], mode, upper_only, mask_diag)
                        for p in layers) / len(layers)
    return loss_diff, loss_token, loss_manifold


@pytest.mark.parametrize("mode, upper_only, mask_diag, prediction, snr_gamma, target_spatial_norm", [
    ("sample", False, True, "epsilon", None, None), ("token", True, False, "v", 5.0, None),
    ("sample", False, False, "epsilon", None, 0.6)])
def test_objective_sums_the_terms_once_and_divides_for_accumulation(scheduler, mode, upper_only, mask_diag,
                                                                    prediction, snr_gamma, target_spatial_norm):
    """terms = (L_diff + lambda (L_token + w L_manifold), L_diff, L_token, L_manifold), detached; the loss to
    back-propagate is L / accumulate, in the graph; every setting reaches its term."""
    inputs = objective_inputs()
    inputs["model_pred"].requires_grad_(True)
    objective = Objective.from_settings(scheduler, {"prediction": prediction, "snr_gamma": snr_gamma,
                                                    "manifold_coeff": 2.5, "manifold_mode": mode,
                                                    "manifold_upper_only": upper_only, "manifold_mask_diag": mask_diag,
                                                    "target_spatial_norm": target_spatial_norm})
    normalised = inputs if target_spatial_norm is None else {
        **inputs, "target_tokens": spatially_normalised_by_hand(inputs["target_tokens"], target_spatial_norm)}
    loss_diff, loss_token, loss_manifold = by_hand(normalised, scheduler, prediction, snr_gamma, mode, upper_only,
                                                   mask_diag)
    expected = loss_diff + 0.7 * (loss_token + 2.5 * loss_manifold)
    terms, loss = objective(**inputs, align_coeff=0.7, accumulate=4)
    torch.testing.assert_close(terms, torch.stack([expected, loss_diff, loss_token, loss_manifold]), rtol=1e-6, atol=0)
    torch.testing.assert_close(loss, expected / 4, rtol=1e-6, atol=0)
    assert not terms.requires_grad and loss.requires_grad
    _, plain = objective(**inputs, align_coeff=0.7)
    torch.testing.assert_close(plain, expected, rtol=1e-6, atol=0)


def test_objective_without_aligned_tokens_is_the_diffusion_loss_with_nan_alignment_terms(scheduler):
    inputs = {**objective_inputs(), "pred_tokens": {}}
    objective = Objective(scheduler, "epsilon", None, manifold_coeff=3.0)
    terms, loss = objective(**inputs, align_coeff=0.8, accumulate=2)
    loss_diff = diffusion_loss(inputs["model_pred"], inputs["target"])
    assert terms[0] == terms[1] == loss_diff and torch.isnan(terms[2:]).all()
    torch.testing.assert_close(loss, loss_diff / 2, rtol=0, atol=0)


def test_objective_with_the_global_gram_divides_only_the_per_batch_terms(scheduler):
    """With a gather that knows the other micro-batches' rows, the manifold term is already the global batch's:
    loss = (L_diff + lambda L_token) / accumulate + lambda w L_manifold."""
    inputs = objective_inputs()
    layers = list(inputs["pred_tokens"])
    others = {layer: (torch.randn(4, 8), torch.randn(4, 8)) for layer in layers}

    class KnownRows:  # urepa.batches.GlobalBatch's interface: this micro-batch is rows 0-3 of 8
        known = True

        def __call__(self, layer, pred, target):
            return torch.cat([pred, others[layer][0]]), torch.cat([target, others[layer][1]])

    objective = Objective(scheduler, "epsilon", None, manifold_coeff=3.0)
    terms, loss = objective(**inputs, align_coeff=0.5, accumulate=2, gather=KnownRows())
    loss_diff, loss_token, _ = by_hand(inputs, scheduler, "epsilon", None, "sample", False, False)
    # each layer's Gram over all 8 rows: this micro-batch's 4 and the other 4, known
    loss_manifold = sum(manifold_loss(inputs["pred_tokens"][layer], inputs["target_tokens"], "sample",
                                      gather=functools.partial(KnownRows(), layer)) for layer in layers) / len(layers)
    assert loss_manifold != pytest.approx(by_hand(inputs, scheduler, "epsilon", None, "sample", False, False)[2])
    torch.testing.assert_close(terms[3], loss_manifold, rtol=1e-6, atol=0)
    torch.testing.assert_close(loss, (loss_diff + 0.5 * loss_token) / 2 + 0.5 * 3.0 * loss_manifold, rtol=1e-6,
                               atol=0)


def test_objective_charges_the_alignment_terms_to_the_alignment_phase(scheduler):
    phases = []
    timer = lambda phase: phases.append(phase) or contextlib.nullcontext()  # noqa: E731
    objective = Objective.from_settings(scheduler, {"prediction": "epsilon", "snr_gamma": None, "manifold_coeff": 3.0,
                                                    "manifold_mode": "sample", "manifold_upper_only": False,
                                                    "manifold_mask_diag": False, "target_spatial_norm": None}, timer)
    objective(**objective_inputs(), align_coeff=0.5)
    objective(**{**objective_inputs(), "pred_tokens": {}}, align_coeff=0.5)
    assert phases == ["alignment"]
