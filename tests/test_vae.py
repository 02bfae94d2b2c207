"""The VAE as a setting (urepa.vae): checking an AutoencoderKL folder, the latent normalisation read from its
config, and the record that ties latents and weights to their VAE."""
import json

import pytest
import torch
from diffusers import AutoencoderKL

from conftest import CPU, SMOKE_IMAGE_SIZE
from urepa import generated
from urepa.vae import (LatentNormalisation, VaeMismatchError, check_same_vae, check_vae_dir, load_autoencoder,
                       vae_dir, vae_record)

# A 64 px image through a tiny f8 autoencoder: 4 x 8 x 8 latents.
SMALL_VAE = dict(in_channels=3, out_channels=3, latent_channels=4, layers_per_block=1, norm_num_groups=8,
                 down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                 block_out_channels=(8, 8, 16, 16), sample_size=64)
# diffusers' AutoencoderKL config keys beyond scaling_factor, as SDXL-style (per-channel mean / std) and SD3-style
# (shift) VAEs set them.
PER_CHANNEL = {"scaling_factor": 0.5, "latents_mean": [0.1, -0.2, 0.3, 0.05], "latents_std": [0.9, 1.3, 0.7, 1.1]}
SHIFTED = {"scaling_factor": 1.5, "shift_factor": 0.0609}


def saved_vae(folder, **config):
    torch.manual_seed(0)
    AutoencoderKL(**{**SMALL_VAE, **config}).save_pretrained(folder)
    return folder


# -- the normalisation ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("config", [{"scaling_factor": 0.18215}, PER_CHANNEL, SHIFTED],
                         ids=["scaling-only", "latents-mean-std", "shift"])
def test_normalise_then_denormalise_decodes_to_the_vaes_own_reconstruction(tmp_path, config):
    """encode -> normalise -> denormalise -> decode is the VAE's own encode -> decode, for each kind of config."""
    vae = load_autoencoder(saved_vae(tmp_path / "vae", **config), CPU)
    norm = LatentNormalisation.from_config(vae.config)
    images = torch.rand(2, 3, 64, 64) * 2 - 1
    with torch.no_grad():
        z = vae.encode(images).latent_dist.mean
        own = vae.decode(z).sample
        through = vae.decode(norm.denormalise(norm.normalise(z))).sample
    torch.testing.assert_close(through, own, rtol=1e-5, atol=1e-5)


def test_normalisation_follows_diffusers_conventions_by_hand():
    z = torch.randn(3, 4, 8, 8, dtype=torch.float64)
    assert torch.equal(LatentNormalisation.from_config({"scaling_factor": 0.18215}).normalise(z), z * 0.18215)
    mean = torch.tensor(PER_CHANNEL["latents_mean"], dtype=torch.float64).view(1, 4, 1, 1)
    std = torch.tensor(PER_CHANNEL["latents_std"], dtype=torch.float64).view(1, 4, 1, 1)
    # SDXL-style pipelines: (z - mean) * scaling_factor / std, and back: x * std / scaling_factor + mean
    torch.testing.assert_close(LatentNormalisation.from_config(PER_CHANNEL).normalise(z), (z - mean) * 0.5 / std)
    x = torch.randn(3, 4, 8, 8, dtype=torch.float64)
    torch.testing.assert_close(LatentNormalisation.from_config(PER_CHANNEL).denormalise(x), x * std / 0.5 + mean)
    # SD3-style: (z - shift) * scaling_factor, and back: x / scaling_factor + shift
    torch.testing.assert_close(LatentNormalisation.from_config(SHIFTED).normalise(z), (z - 0.0609) * 1.5)
    torch.testing.assert_close(LatentNormalisation.from_config(SHIFTED).denormalise(x), x / 1.5 + 0.0609)


def test_a_mean_without_a_std_is_refused():
    with pytest.raises(ValueError, match="latents_mean.*latents_std"):
        LatentNormalisation.from_config({"scaling_factor": 1.0, "latents_mean": [0.0] * 4})


# -- which folder, and is it one --------------------------------------------------------------------------------


def test_vae_names_resolve_to_folders(tmp_path):
    assert vae_dir("sd15", tmp_path / "sd15", {}) == tmp_path / "sd15" / "vae"
    assert vae_dir("e2e", tmp_path / "sd15", {"e2e": str(tmp_path / "e2e")}) == tmp_path / "e2e"
    with pytest.raises(KeyError, match="'other'.*e2e"):
        vae_dir("other", tmp_path / "sd15", {"e2e": str(tmp_path / "e2e")})


def test_check_vae_dir_accepts_an_f8_4_channel_autoencoder(tmp_path):
    assert check_vae_dir(saved_vae(tmp_path / "vae"), "vaes.e2e") == tmp_path / "vae"


@pytest.mark.parametrize("problem, match", [
    ("missing", "does not exist"), ("no weights", "not a diffusers AutoencoderKL folder"),
    ("other class", "holds a UNet2DModel"), ("8 channels", "8-channel latents at 1/8"),
    ("f4", "4-channel latents at 1/4"),
])
def test_check_vae_dir_names_the_key_and_the_problem(tmp_path, problem, match):
    folder = tmp_path / "vae"
    if problem == "no weights":
        folder.mkdir()
        (folder / "config.json").write_text(json.dumps({"_class_name": "AutoencoderKL"}))
    elif problem == "other class":
        saved_vae(folder)
        config = json.loads((folder / "config.json").read_text())
        (folder / "config.json").write_text(json.dumps({**config, "_class_name": "UNet2DModel"}))
    elif problem == "8 channels":
        saved_vae(folder, latent_channels=8)
    elif problem == "f4":
        saved_vae(folder, block_out_channels=(8, 8, 16), down_block_types=("DownEncoderBlock2D",) * 3,
                  up_block_types=("UpDecoderBlock2D",) * 3)
    with pytest.raises((OSError, ValueError), match=f"config key 'vaes.e2e'.*{match}"):
        check_vae_dir(folder, "config key 'vaes.e2e'")


# -- the generated stand-in and the record ------------------------------------------------------------------------


def test_the_generated_second_vae_is_sd15s_architecture_with_other_weights(smoke_inputs):
    sd15_vae, e2e = smoke_inputs["sd15"] / "vae", smoke_inputs["e2e_vae"]
    check_vae_dir(e2e, "vaes.e2e")
    ours, theirs = json.loads((e2e / "config.json").read_text()), json.loads((sd15_vae / "config.json").read_text())
    assert ours["block_out_channels"] == theirs["block_out_channels"] and ours["scaling_factor"] == 0.25
    a, b = load_autoencoder(e2e).state_dict(), load_autoencoder(sd15_vae).state_dict()
    assert a.keys() == b.keys() and not torch.equal(a["encoder.conv_in.weight"], b["encoder.conv_in.weight"])
    # the same name and seed give the same weights; another name, others
    again = generated.make_vae("e2e", smoke_inputs["e2e_vae"].parent / "again", SMOKE_IMAGE_SIZE, False, seed=0)
    other = generated.make_vae("other", smoke_inputs["e2e_vae"].parent / "other", SMOKE_IMAGE_SIZE, False, seed=0)
    assert vae_record("e2e", again)["fingerprint"] == vae_record("e2e", e2e)["fingerprint"]
    assert vae_record("other", other)["fingerprint"] != vae_record("e2e", e2e)["fingerprint"]


def test_another_vae_is_refused_naming_both(smoke_inputs):
    sd15 = vae_record("sd15", smoke_inputs["sd15"] / "vae")
    e2e = vae_record("e2e", smoke_inputs["e2e_vae"])
    check_same_vae(sd15, dict(sd15), "latent cache c.zarr")
    with pytest.raises(VaeMismatchError, match=r"latent cache c.zarr: made with VAE 'sd15' .* but given VAE 'e2e'"):
        check_same_vae(sd15, e2e, "latent cache c.zarr")
