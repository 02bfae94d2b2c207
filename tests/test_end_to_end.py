"""REPA-E's three passes on SD-1.5's (smoke-sized) U-Net and VAE: which parameters each loss term reaches, the
stopped U-Net forward of the VAE-side alignment, and the normaliser's role in each pass."""
import pytest
import torch

from conftest import SMOKE_IMAGE_SIZE, settings_for
from urepa.discriminator import PatchDiscriminator
from urepa.end_to_end import EndToEnd, VaeLossWeights, deepest_aligned_module
from urepa.latent_pinning import MomentPinning
from urepa.losses import Objective
from urepa.models import AlignedUNet, make_trainable
from urepa.reconstruction import load_lpips
from urepa.sd15 import load_noise_scheduler, load_unet
from urepa.vae import LatentNormalisation, load_autoencoder

BATCH = 2
GRID, DIM = 4, 64  # the smoke DINOv2's 4 x 4 grid of 64-wide tokens


def build(smoke_inputs, weights: VaeLossWeights | None = None, discriminator=True, layers=("mid",)) -> EndToEnd:
    torch.manual_seed(0)
    settings = settings_for("urepa")
    unet = load_unet(smoke_inputs["sd15"])
    make_trainable(unet, "lora", settings["lora_rank"], settings["lora_targets"])
    model = AlignedUNet(unet, list(layers), DIM, GRID, settings["projector"], settings["projector_hidden"])
    vae = load_autoencoder(smoke_inputs["sd15"] / "vae").requires_grad_(True).train()
    lpips_model, _ = load_lpips(None, "cpu")
    pinning = MomentPinning([0.1, -0.2, 0.3, 0.0], [4.0, 5.0, 6.0, 7.0])
    objective = Objective.from_settings(load_noise_scheduler(smoke_inputs["sd15"]), settings)
    return EndToEnd(vae, model, pinning, LatentNormalisation.from_config(vae.config), objective, lpips_model,
                    weights or VaeLossWeights(),
                    PatchDiscriminator(width=8) if discriminator else None)


def inputs(seed: int = 0) -> dict:
    generator = torch.Generator().manual_seed(seed)
    latent = (BATCH, 4, SMOKE_IMAGE_SIZE // 8, SMOKE_IMAGE_SIZE // 8)
    return {"images": torch.rand(BATCH, 3, SMOKE_IMAGE_SIZE, SMOKE_IMAGE_SIZE, generator=generator) * 2 - 1,
            "posterior_noise": torch.randn(latent, generator=generator),
            "noise": torch.randn(latent, generator=generator),
            "timesteps": torch.randint(0, 1000, (BATCH,), generator=generator),
            "encoder_hidden_states": torch.randn(BATCH, 77, 32, generator=generator),
            "tokens": torch.nn.functional.normalize(torch.randn(BATCH, GRID * GRID, DIM, generator=generator), dim=-1),
            "anchor_mean": torch.randn(latent, generator=generator)}


def groups(e2e: EndToEnd) -> dict[str, list[torch.nn.Parameter]]:
    """The parameter groups whose gradients the tests read (everything that has a gradient in some pass)."""
    return {"encoder": [*e2e.vae.encoder.parameters(), *e2e.vae.quant_conv.parameters()],
            "decoder": [*e2e.vae.decoder.parameters(), *e2e.vae.post_quant_conv.parameters()],
            "lora": [p for name, p in e2e.model.unet.named_parameters() if "lora" in name],
            "heads": list(e2e.model.heads.parameters()),
            "discriminator": list(e2e.discriminator.parameters())}


def reached(term: torch.Tensor, e2e: EndToEnd) -> dict[str, bool]:
    """For each group: does `term` have a non-zero gradient on any of its parameters?"""
    named = groups(e2e)
    flat = [p for params in named.values() for p in params]
    grads = torch.autograd.grad(term, flat, retain_graph=True, allow_unused=True)
    out, start = {}, 0
    for name, params in named.items():
        part = grads[start:start + len(params)]
        out[name] = any(g is not None and bool(g.abs().sum() > 0) for g in part)
        start += len(params)
    return out


def vae_pass(e2e: EndToEnd, x: dict, gan: bool = True) -> dict:
    posterior, z = e2e.encode(x["images"], x["posterior_noise"])
    return e2e.vae_terms(x["images"], posterior, z, x["noise"], x["timesteps"], x["encoder_hidden_states"],
                         x["tokens"], x["anchor_mean"], gan=gan) | {"z": z}


@pytest.fixture(scope="module")
def routed(smoke_inputs):
    e2e = build(smoke_inputs, VaeLossWeights(anchor=1.0))
    x = inputs()
    terms = vae_pass(e2e, x)
    return e2e, x, terms


def test_reconstruction_terms_reach_the_vae_and_no_unet_parameter(routed):
    e2e, _, terms = routed
    for name in ("l1", "lpips"):
        assert reached(terms[name], e2e) == {"encoder": True, "decoder": True, "lora": False, "heads": False,
                                             "discriminator": False}, name
    for name in ("kl", "anchor"):  # functions of the posterior only
        assert reached(terms[name], e2e) == {"encoder": True, "decoder": False, "lora": False, "heads": False,
                                             "discriminator": False}, name


def test_the_gan_term_reaches_the_vae_through_a_frozen_discriminator(routed):
    e2e, _, terms = routed
    assert reached(terms["gan"], e2e) == {"encoder": True, "decoder": True, "lora": False, "heads": False,
                                          "discriminator": False}
    assert all(p.requires_grad for p in e2e.discriminator.parameters())  # trainable again after the pass


def test_the_vae_side_alignment_reaches_the_encoder_only(routed):
    """Through the latents into the encoder; not the decoder, and not the U-Net's LoRA or the heads (frozen in the
    VAE pass as REPA-E freezes its SiT)."""
    e2e, _, terms = routed
    assert reached(terms["align"], e2e) == {"encoder": True, "decoder": False, "lora": False, "heads": False,
                                            "discriminator": False}
    assert all(p.requires_grad for p in groups(e2e)["lora"] + groups(e2e)["heads"])
    assert e2e.model.training


def test_the_diffusion_loss_gives_the_vae_zero_gradient(routed):
    """The U-Net pass reads the latents detached (REPA-E's stop-gradient): L_diff and its alignment term train the
    LoRA and heads, never the VAE."""
    e2e, x, terms = routed
    loss_terms, loss = e2e.unet_terms(terms["z"], x["noise"], x["timesteps"], x["encoder_hidden_states"], x["tokens"],
                                      align_coeff=0.5, update_statistics=False)
    assert reached(loss, e2e) == {"encoder": False, "decoder": False, "lora": True, "heads": True,
                                  "discriminator": False}
    assert torch.isfinite(loss_terms).all()


def test_the_discriminator_loss_reaches_only_the_discriminator(routed):
    e2e, x, terms = routed
    d_terms = e2e.discriminator_loss(x["images"], terms["reconstructions"])
    assert reached(d_terms["loss"], e2e) == {"encoder": False, "decoder": False, "lora": False, "heads": False,
                                             "discriminator": True}


def test_the_vae_pass_loss_is_the_weighted_sum_of_its_terms(routed):
    e2e, _, terms = routed
    w = e2e.weights
    expected = (w.l1 * terms["l1"] + w.lpips * terms["lpips"] + w.kl * terms["kl"] + w.gan * terms["gan"]
                + w.align * terms["align"] + w.anchor * terms["anchor"])
    torch.testing.assert_close(terms["loss"], expected)


def test_the_stopped_forward_gives_the_full_forwards_tokens(smoke_inputs):
    """The VAE-side alignment stops the U-Net after its deepest aligned layer: the same tokens (and token loss) as
    the full forward of the U-Net pass, at a fraction of its cost."""
    e2e = build(smoke_inputs, discriminator=False)
    x = inputs(1)
    with torch.no_grad():
        _, z = e2e.encode(x["images"], x["posterior_noise"])
        stopped = e2e.vae_alignment(z, x["noise"], x["timesteps"], x["encoder_hidden_states"], x["tokens"])
        latents = e2e.unet_latents(z)
        noisy = e2e.objective.noise_scheduler.add_noise(latents, x["noise"], x["timesteps"])
        _, tokens = e2e.model(noisy, x["timesteps"], x["encoder_hidden_states"])
        full = 1 - torch.nn.functional.cosine_similarity(tokens["mid"], x["tokens"], dim=-1).mean()
    torch.testing.assert_close(stopped, full)
    assert deepest_aligned_module(["mid", "enc_last"]) == "mid_block"
    assert deepest_aligned_module(["dec_first", "mid"]) == "up_blocks.0.resnets.-1"


def test_the_vae_pass_leaves_the_normaliser_and_the_unet_pass_moves_it(smoke_inputs):
    e2e = build(smoke_inputs, discriminator=False)
    x = inputs(2)
    before = {name: b.clone() for name, b in e2e.pinning.named_buffers()}
    terms = vae_pass(e2e, x, gan=False)
    terms["loss"].backward()
    assert all(torch.equal(b, before[name]) for name, b in e2e.pinning.named_buffers())
    e2e.unet_terms(terms["z"], x["noise"], x["timesteps"], x["encoder_hidden_states"], x["tokens"], 0.5)
    assert not torch.equal(e2e.pinning.running_mean, before["running_mean"])


def test_lpips_is_kept_out_of_the_state_dict(smoke_inputs):
    e2e = build(smoke_inputs, discriminator=False)
    keys = e2e.state_dict().keys()
    assert not any(k.startswith("lpips.") for k in keys)
    assert any(k.startswith("pinning.") for k in keys) and any(k.startswith("vae.") for k in keys)


def test_tuning_without_an_aligned_layer_is_refused(smoke_inputs):
    with pytest.raises(ValueError, match="align_layers"):
        build(smoke_inputs, layers=())
