"""The networks the sample metrics read features with (urepa.feature_networks): the Inception code path through a
tiny fake of clean-fid's torchscript (the real weights cannot be downloaded here) and through the rehearsal tier's
random Inception at the real shapes, and the stand-in network of the smoke tier."""
import re
from collections import OrderedDict
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from conftest import write_images
from urepa import feature_networks
from urepa.feature_networks import (
    INCEPTION_FILENAME,
    INCEPTION_LAYERS,
    INCEPTION_NAME,
    InceptionFeatures,
    StandInFeatures,
    build_feature_network,
)
from urepa.metrics import extract_features, list_images


# ---------------------------------------------------------------- the Inception path, through a fake torchscript


def conv(in_channels: int, out_channels: int, kernel: int, stride: int = 1, padding: int = 0) -> nn.Module:
    return nn.Sequential(nn.Conv2d(in_channels, out_channels, kernel, stride, padding), nn.ReLU())


class FakeMixed6(nn.Module):
    """Like the real mixed_6: a `conv` branch (192 channels there) concatenated with others."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = conv(channels, 8, 1)
        self.tower = conv(channels, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.conv(x), self.tower(x)], 1)


class FakeInception(nn.Module):
    """The real torchscript's module tree and spatial sizes (299 -> 17 x 17 at mixed_6 -> 2048 x 1 x 1),
    with a handful of channels."""

    def __init__(self) -> None:
        super().__init__()
        c = 4
        self.layers = nn.Sequential(OrderedDict([
            ("conv", conv(3, c, 3, 2)), ("conv_1", conv(c, c, 3)), ("conv_2", conv(c, c, 3, padding=1)),
            ("pool0", nn.MaxPool2d(3, 2)), ("conv_3", conv(c, c, 1)), ("conv_4", conv(c, c, 3)),
            ("pool1", nn.MaxPool2d(3, 2)), ("mixed", conv(c, c, 1)), ("mixed_1", conv(c, c, 1)),
            ("mixed_2", conv(c, c, 1)), ("mixed_3", conv(c, c, 3, 2)), ("mixed_4", conv(c, c, 1)),
            ("mixed_5", conv(c, c, 1)), ("mixed_6", FakeMixed6(c)), ("mixed_7", conv(c + 8, c, 1)),
            ("mixed_8", conv(c, c, 3, 2)), ("mixed_9", conv(c, c, 1)), ("mixed_10", conv(c, 2048, 1)),
            ("pool2", nn.AvgPool2d(8)),
        ]))
        self.output = nn.Linear(2048, 1008)
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                # He init, no bias: PyTorch's default shrinks the signal through 18 layers until the features
                # are the last biases, and no longer depend on the image (nor on a wrong normalisation).
                nn.init.kaiming_normal_(module.weight, nonlinearity="relu")
                nn.init.zeros_(module.bias)

    def forward(self, img: torch.Tensor, return_features: bool = False) -> torch.Tensor:
        features = self.layers((img - 128) / 128).reshape(-1, 2048)
        if return_features:
            return features
        return F.softmax(F.linear(features, self.output.weight), 1)


@pytest.fixture(scope="module")
def fake_inception_dir(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("inception")
    torch.manual_seed(0)
    torch.jit.save(torch.jit.script(FakeInception().eval()), str(folder / INCEPTION_FILENAME))
    return folder


def test_inception_features_have_pool_and_sfid_shapes(fake_inception_dir, tmp_path):
    network = build_feature_network("inception", fake_inception_dir)
    paths = write_images(tmp_path / "images", [(64, 64), (80, 48), (299, 299)])
    Image.open(paths[0]).convert("L").save(paths[0])  # a grey file is read as RGB
    features = extract_features(network, list_images(tmp_path / "images"), batch_size=2)
    assert features["pool"].shape == (3, 2048)
    assert features["spatial"].shape == (3, 7 * 17 * 17)
    assert features["logits"].shape == (3, 1008)
    assert features["feature_network"] == INCEPTION_NAME


def test_inception_features_are_the_torchscript_outputs_in_one_pass(fake_inception_dir):
    network = InceptionFeatures(fake_inception_dir)
    images = np.random.default_rng(10).integers(0, 256, size=(2, 40, 30, 3), dtype=np.uint8)
    features = network.features(images)

    base = torch.jit.load(str(fake_inception_dir / INCEPTION_FILENAME))
    resized = torch.stack([network.resize(image) for image in images])
    x = (resized - 128) / 128
    for name in INCEPTION_LAYERS[:INCEPTION_LAYERS.index("mixed_6")]:
        x = getattr(base.layers, name)(x)
    spatial = base.layers.mixed_6.conv(x)[:, :7].permute(0, 2, 3, 1).reshape(2, -1)  # ADM's (h, w, c) order
    pool = base(resized, return_features=True)
    # the features depend on the image: a 1/255 shift of every input value moves them
    assert (base(resized + 1, return_features=True) - pool).abs().max() > 1e-3 * pool.abs().max()
    np.testing.assert_allclose(features["pool"], pool.detach().numpy(), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(features["spatial"], spatial.detach().numpy(), rtol=1e-5, atol=1e-6)
    # IS probabilities as the torchscript gives them without the output bias.
    np.testing.assert_allclose(torch.softmax(torch.from_numpy(features["logits"]), 1).numpy(),
                               base(resized).detach().numpy(), rtol=1e-5, atol=1e-7)


def test_resize_is_clean_fid_clean_mode():
    from cleanfid.resize import build_resizer

    image = np.random.default_rng(11).integers(0, 256, size=(50, 70, 3), dtype=np.uint8)
    expected = build_resizer("clean")(image).transpose(2, 0, 1)
    np.testing.assert_array_equal(StandInFeatures(input_size=299).resize(image).numpy(), expected)


class TruncatedInception(nn.Module):
    """A torchscript that is not clean-fid's: FakeInception's layers without `drop`, and no `output` layer
    if asked."""

    def __init__(self, drop: str, with_output: bool) -> None:
        super().__init__()
        kept = ((name, module) for name, module in FakeInception().layers.named_children() if name != drop)
        self.layers = nn.Sequential(OrderedDict(kept))
        if with_output:
            self.output = nn.Linear(2048, 1008)

    def forward(self, img: torch.Tensor) -> torch.Tensor:
        return self.layers(img)


@pytest.mark.parametrize("drop, with_output, missing", [("pool2", True, "['pool2']"), ("", False, "[]")])
def test_a_torchscript_that_is_not_clean_fids_inception_is_refused(tmp_path, drop, with_output, missing):
    torch.jit.save(torch.jit.script(TruncatedInception(drop, with_output).eval()), str(tmp_path / INCEPTION_FILENAME))
    expected = rf"is not clean-fid's Inception torchscript \(layers missing: {re.escape(missing)}\)"
    with pytest.raises(ValueError, match=expected):
        InceptionFeatures(tmp_path)


def test_the_inception_network_is_frozen(fake_inception_dir):
    network = InceptionFeatures(fake_inception_dir)
    assert list(network.parameters()) and not any(p.requires_grad for p in network.parameters())


def test_missing_inception_weights_name_the_expected_path(tmp_path):
    with pytest.raises(FileNotFoundError) as error:
        build_feature_network("inception", tmp_path)
    assert str(tmp_path / INCEPTION_FILENAME) in str(error.value)
    assert "torchscript" in str(error.value)


def test_feature_network_factory_rejects_bad_requests():
    with pytest.raises(ValueError, match="weights_dir"):
        build_feature_network("inception")
    with pytest.raises(ValueError, match="unknown"):
        build_feature_network("vgg")


def test_the_inception_network_is_built_on_the_requested_device(monkeypatch, tmp_path):
    built = []
    monkeypatch.setattr(feature_networks, "InceptionFeatures", lambda *args: built.append(args) or "network")
    assert build_feature_network("inception", tmp_path, device="cuda:3") == "network"
    assert built == [(tmp_path, "cuda:3")]


# ---------------------------------------------------------------- the rehearsal tier's random Inception


def test_inception_features_at_299_px_have_the_real_dimensions(inception_dir):
    network = build_feature_network("inception", inception_dir)
    images = np.random.default_rng(0).integers(0, 256, size=(3, 540, 610, 3), dtype=np.uint8)
    features = network.features(images)
    assert network.input_size == 299 and network.name == INCEPTION_NAME
    assert features["pool"].shape == (3, 2048)
    assert features["spatial"].shape == (3, 7 * 17 * 17) == (3, 2023)  # mixed_6.conv, first 7 of 192 channels
    assert features["logits"].shape == (3, 1008)
    assert np.isfinite(features["pool"]).all() and features["pool"].std(axis=0).max() > 0


# ---------------------------------------------------------------- the stand-in network


def test_stand_in_network_is_deterministic_and_leaves_the_global_rng_alone():
    rng_state = torch.get_rng_state()
    first, second = StandInFeatures(), StandInFeatures()
    assert torch.equal(torch.get_rng_state(), rng_state)
    images = np.random.default_rng(12).integers(0, 256, size=(3, 32, 32, 3), dtype=np.uint8)
    a, b = first.features(images), second.features(images)
    for key in ("pool", "spatial", "logits"):
        np.testing.assert_array_equal(a[key], b[key])
    assert a["pool"].shape == (3, 128) and a["spatial"].shape == (3, 7 * 8 * 8) and a["logits"].shape == (3, 10)
    assert "stand-in" in first.name and "NOT Inception" in first.name
    assert not np.array_equal(StandInFeatures(seed=1).features(images)["pool"], a["pool"])


def test_stand_in_network_is_the_fixed_function_its_name_stands_for():
    """Reference statistics are matched to generated features by the network's name alone, and the stand-in's
    name gives its seed, not its layers: a change to its architecture or initialisation must change its name,
    or statistics cached by the old network would be compared with the new one's features. These are its
    features of fixed images (changing them means renaming the stand-in)."""
    images = np.random.default_rng(12).integers(0, 256, size=(3, 32, 32, 3), dtype=np.uint8)
    features = StandInFeatures().features(images)
    expected = {"pool": (0.221959134, 0.217749318, [0.04086054, 0.03258585, 0.16443437]),
                "spatial": (0.291168089, 0.361379137, [0.09146279, 0.0, 0.3265101]),
                "logits": (0.678708822, 2.182519074, [-1.09384155, -0.21720129, 0.47256851])}
    for key, (mean, std, first) in expected.items():
        values = features[key].astype(np.float64)
        assert values.mean() == pytest.approx(mean, rel=1e-4) and values.std() == pytest.approx(std, rel=1e-4)
        np.testing.assert_allclose(values[0, :3], first, rtol=1e-4, atol=1e-6)


def test_stand_in_network_is_frozen_bias_free_at_the_logits_and_on_the_requested_device():
    network = build_feature_network("stand-in", device="meta")
    assert network.device.type == "meta"
    assert not any(p.requires_grad for p in network.parameters())
    assert network.classifier.bias is None  # the IS convention: no output bias


def test_stand_in_network_sizes_follow_its_parameters():
    images = np.random.default_rng(8).integers(0, 256, size=(2, 40, 40, 3), dtype=np.uint8)
    network = StandInFeatures(input_size=32, pool_dim=24, num_classes=5)
    out = network.features(images)
    assert network.input_size == 32
    assert out["pool"].shape == (2, 24) and out["logits"].shape == (2, 5)
    assert out["spatial"].shape == (2, 7 * 4 * 4)  # an 8x downsampling trunk: 32 px -> 4 x 4
    assert torch.equal(network.resize(images[0]), network.resize(images[0])) and network.resize(images[0]).shape == (3, 32, 32)
