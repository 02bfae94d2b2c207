"""The PatchGAN of REPA-E's VAE loss and its hinge losses."""
import pytest
import torch

from urepa.discriminator import PatchDiscriminator, generator_loss, hinge_discriminator_loss


def test_patch_logits_at_256_px_are_30_by_30():
    logits = PatchDiscriminator(width=8)(torch.rand(2, 3, 256, 256))
    assert logits.shape == (2, 1, 30, 30)


def test_layout_is_pix2pix_n_layer_with_batchnorm():
    """REPA-E's checkpoint keys (`main.<index>.*`) and shapes: convolutions at 0, 2, 5, 8, 11, BatchNorm at 3, 6, 9,
    no bias before a BatchNorm."""
    shapes = {name: tuple(value.shape) for name, value in PatchDiscriminator().state_dict().items()}
    assert shapes["main.0.weight"] == (64, 3, 4, 4) and shapes["main.0.bias"] == (64,)
    assert shapes["main.2.weight"] == (128, 64, 4, 4) and "main.2.bias" not in shapes
    assert shapes["main.5.weight"] == (256, 128, 4, 4)
    assert shapes["main.8.weight"] == (512, 256, 4, 4)
    assert shapes["main.11.weight"] == (1, 512, 4, 4) and shapes["main.11.bias"] == (1,)
    for index, width in [(3, 128), (6, 256), (9, 512)]:
        assert shapes[f"main.{index}.running_var"] == (width,)


def test_initialisation_is_normal_0_02_and_batchnorm_scales_near_1():
    torch.manual_seed(0)
    model = PatchDiscriminator()
    assert model.main[8].weight.std().item() == pytest.approx(0.02, rel=0.02)
    assert abs(model.main[8].weight.mean().item()) < 1e-3
    assert model.main[9].weight.mean().item() == pytest.approx(1.0, abs=0.01)
    assert torch.equal(model.main[9].bias, torch.zeros(512))


def test_hinge_losses_by_hand():
    real = torch.tensor([2.0, 0.5, -1.0])
    fake = torch.tensor([-2.0, 0.0, 1.0])
    # relu(1 - real) = [0, 0.5, 2] -> mean 5/6; relu(1 + fake) = [0, 1, 2] -> mean 1.
    assert hinge_discriminator_loss(real, fake).item() == pytest.approx(0.5 * (5 / 6 + 1))
    assert generator_loss(fake).item() == pytest.approx(1 / 3)
