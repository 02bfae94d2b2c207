"""Generated inputs: the rehearsal tier's random Inception goes through the real `inception_dir` path at
the real shapes; the full-size configs build the real architectures' shapes; the image tree's sides."""
import numpy as np
import pytest
import torch
from PIL import Image

from urepa import generated
from urepa.dinov2 import DINOV2_VITL14_CONFIG
from urepa.metrics import INCEPTION_FILENAME, INCEPTION_LAYERS, INCEPTION_NAME, build_feature_network
from urepa.sd15 import SD15_TEXT_ENCODER_CONFIG, SD15_UNET_CONFIG, SD15_VAE_CONFIG


@pytest.fixture(scope="module")
def inception_dir(tmp_path_factory):
    return generated.make_model("inception", tmp_path_factory.mktemp("inception"), image_size=512, full_size=True)


def test_random_inception_has_the_tf_graphs_blocks_and_sizes(inception_dir):
    base = torch.jit.load(str(inception_dir / INCEPTION_FILENAME))
    expected = {"conv": (32, 149), "pool1": (192, 35), "mixed": (256, 35), "mixed_2": (288, 35),
                "mixed_3": (768, 17), "mixed_7": (768, 17), "mixed_8": (1280, 8), "mixed_10": (2048, 8),
                "pool2": (2048, 1)}
    x = torch.zeros(1, 3, 299, 299)
    names = []
    for name, layer in base.layers.named_children():
        x = layer(x)
        names.append(name)
        if name in expected:
            channels, side = expected[name]
            assert x.shape[1:] == (channels, side, side), name
    assert tuple(names) == INCEPTION_LAYERS
    assert base.output.weight.shape == (1008, 2048)
    assert base(torch.zeros(2, 3, 299, 299), return_features=True).shape == (2, 2048)


def test_inception_features_at_299_px_have_the_real_dimensions(inception_dir):
    network = build_feature_network("inception", inception_dir)
    images = np.random.default_rng(0).integers(0, 256, size=(3, 540, 610, 3), dtype=np.uint8)
    features = network.features(images)
    assert network.input_size == 299 and network.name == INCEPTION_NAME
    assert features["pool"].shape == (3, 2048)
    assert features["spatial"].shape == (3, 7 * 17 * 17) == (3, 2023)  # mixed_6.conv, first 7 of 192 channels
    assert features["logits"].shape == (3, 1008)
    assert np.isfinite(features["pool"]).all() and features["pool"].std(axis=0).max() > 0


def test_full_size_configs_give_the_real_shapes():
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, Dinov2Config, Dinov2Model

    with torch.device("meta"):
        vae = AutoencoderKL(**SD15_VAE_CONFIG)
        unet = UNet2DConditionModel(**SD15_UNET_CONFIG)
        text = CLIPTextModel(CLIPTextConfig(**SD15_TEXT_ENCODER_CONFIG))
        dino = Dinov2Model(Dinov2Config(**DINOV2_VITL14_CONFIG))
        latents = vae.encode(torch.zeros(1, 3, 512, 512)).latent_dist.mean
        hidden = text(torch.zeros(1, 77, dtype=torch.long)).last_hidden_state
        tokens = dino(pixel_values=torch.zeros(1, 3, 224, 224)).last_hidden_state
    assert latents.shape == (1, 4, 64, 64)
    assert hidden.shape == (1, 77, 768)
    assert tokens.shape == (1, 1 + 16 * 16, 1024)
    assert unet.mid_block.resnets[-1].out_channels == 1280
    assert sum(p.numel() for p in unet.parameters()) == 859_520_964  # stable-diffusion-v1-5's U-Net


def test_image_tree_sides_are_drawn_from_the_tiers_range(tmp_path):
    root = generated.make_imagenet_tree(tmp_path, classes=2, train_images=2, val_images=1, image_sides=(540, 700))
    for path in sorted(root.rglob("*.JPEG")):
        with Image.open(path) as image:
            assert all(540 <= side < 700 for side in image.size)


def test_unknown_generated_model_is_named(tmp_path):
    with pytest.raises(ValueError, match="no generated model called 'clip'"):
        generated.make_model("clip", tmp_path, 512, True)
