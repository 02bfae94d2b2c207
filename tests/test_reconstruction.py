"""The VAE reconstruction metrics (urepa.reconstruction) against closed forms and independent implementations:
PSNR and SSIM against scikit-image, LPIPS against lpips models built by hand, and the stage end to end on a tiny
AutoencoderKL, with no download anywhere."""
import contextlib
import copy
import math
import urllib.request
import warnings

import lpips
import numpy as np
import pandas as pd
import pytest
import torch
import torchvision
from diffusers import AutoencoderKL
from PIL import Image
from skimage.metrics import peak_signal_noise_ratio, structural_similarity
from torchvision import transforms

from conftest import CPU, SEED
from urepa import reconstruction
from urepa.feature_networks import StandInFeatures
from urepa.metrics import feature_statistics, frechet_distance
from urepa.reconstruction import load_lpips, psnr, reconstruct, reconstruction_metrics, ssim

IMAGE_SIZE = 64


def smooth_image(height: int, width: int, seed: int, noise: float = 3.0) -> np.ndarray:
    """A photo-like uint8 image [H, W, 3]: gradients and low-frequency waves per channel, a little noise, values
    kept inside 20..235 so small offsets never clip."""
    rng = np.random.default_rng(seed)
    rows, cols = np.mgrid[0:height, 0:width] / max(height, width)
    channels = []
    for _ in range(3):
        a, b, fx, fy, phase = rng.uniform(-1, 1, 2).tolist() + rng.uniform(1, 4, 2).tolist() + [rng.uniform(0, 6)]
        wave = a * rows + b * cols + 0.5 * np.sin(2 * np.pi * (fx * cols + fy * rows) + phase)
        channels.append(wave)
    image = np.stack(channels, axis=-1)
    image = (image - image.min()) / (image.max() - image.min()) * 200 + 27 + rng.normal(0, noise, image.shape)
    return np.clip(np.round(image), 20, 235).astype(np.uint8)


def as_batch(images: list[np.ndarray]) -> torch.Tensor:
    """uint8 HWC arrays as the float [N, 3, H, W] tensor in 0..255 that psnr and ssim take."""
    return torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float()


def distorted(image: np.ndarray, kind: str, seed: int) -> np.ndarray:
    """A realistic degradation of `image`: noise, blur, or a change of contrast and brightness."""
    rng = np.random.default_rng(seed)
    pixels = image.astype(np.float64)
    if kind == "noise":
        pixels = pixels + rng.normal(0, 8, pixels.shape)
    elif kind == "blur":
        pixels = np.asarray(Image.fromarray(image).resize((image.shape[1] // 2, image.shape[0] // 2),
                                                          Image.BILINEAR).resize(image.shape[1::-1], Image.BICUBIC),
                            dtype=np.float64)
    else:
        pixels = 0.8 * pixels + 30
    return np.clip(np.round(pixels), 0, 255).astype(np.uint8)


# ---------------------------------------------------------------- PSNR


def test_psnr_of_constant_offsets_is_the_closed_form():
    originals = as_batch([smooth_image(48, 64, seed) for seed in range(3)])
    offsets = torch.tensor([1.0, 4.0, 10.0]).view(3, 1, 1, 1)
    expected = [10 * math.log10(255 ** 2 / offset ** 2) for offset in (1.0, 4.0, 10.0)]
    assert psnr(originals, originals + offsets).tolist() == pytest.approx(expected, rel=1e-12)


def test_psnr_matches_skimage_per_image():
    originals = [smooth_image(48, 64, seed) for seed in range(4)]
    reconstructions = [distorted(image, kind, seed)
                       for seed, (image, kind) in enumerate(zip(originals, ("noise", "blur", "contrast", "noise")))]
    expected = [peak_signal_noise_ratio(o, r, data_range=255) for o, r in zip(originals, reconstructions)]
    assert psnr(as_batch(originals), as_batch(reconstructions)).tolist() == pytest.approx(expected, rel=1e-10)


def test_psnr_of_an_exact_reconstruction_is_infinite():
    images = as_batch([smooth_image(48, 64, 0), smooth_image(48, 64, 1)])
    changed = images.clone()
    changed[1, 0, 0, 0] += 1
    values = psnr(images, changed)
    assert values[0] == math.inf and math.isfinite(values[1])


# ---------------------------------------------------------------- SSIM


@pytest.mark.parametrize("height, width", [(64, 64), (96, 128)])
def test_ssim_matches_skimage_per_image(height, width):
    originals = [smooth_image(height, width, seed) for seed in range(4)]
    reconstructions = [distorted(image, kind, seed)
                       for seed, (image, kind) in enumerate(zip(originals, ("noise", "blur", "contrast", "blur")))]
    expected = [structural_similarity(o, r, channel_axis=2, gaussian_weights=True, sigma=1.5,
                                      use_sample_covariance=False, data_range=255)
                for o, r in zip(originals, reconstructions)]
    values = ssim(as_batch(originals), as_batch(reconstructions))
    assert values.shape == (4,)
    assert values.tolist() == pytest.approx(expected, abs=1e-5)
    assert len(set(np.round(expected, 3))) == 4  # the distortions differ, so a wrong window would show


def test_ssim_of_identical_images_is_one_and_of_tiny_images_refused():
    images = as_batch([smooth_image(64, 48, seed) for seed in range(2)])
    assert ssim(images, images).tolist() == pytest.approx([1.0, 1.0], abs=1e-12)
    with pytest.raises(ValueError, match="11 x 11"):
        ssim(images[..., :10], images[..., :10])


# ---------------------------------------------------------------- LPIPS


def quiet_lpips() -> lpips.LPIPS:
    """lpips's own model with a random VGG16 backbone and its v0.1 heads (torchvision's warnings about lpips's
    `pretrained` keyword silenced)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return lpips.LPIPS(net="vgg", pnet_rand=True, verbose=False)


def lpips_inputs(seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Two batches of realistic images in [-1, 1], the second a degraded version of the first."""
    originals = [smooth_image(64, 48, seed + i) for i in range(3)]
    kinds = ("noise", "blur", "contrast")
    degraded = [distorted(image, kind, i) for i, (image, kind) in enumerate(zip(originals, kinds))]
    return as_batch(originals) / 127.5 - 1, as_batch(degraded) / 127.5 - 1


# Every route by which torch or torchvision fetches weights; `downloads_refused` makes each one fail the test.
DOWNLOAD_ROUTES = ((torch.hub, "load_state_dict_from_url"), (torchvision.models._api, "load_state_dict_from_url"),
                   (torch.hub, "download_url_to_file"), (torch.hub, "urlopen"), (urllib.request, "urlopen"))


def refuse_download(*args, **kwargs):
    raise AssertionError(f"attempted download: {args}")


@contextlib.contextmanager
def downloads_refused():
    with pytest.MonkeyPatch.context() as patch:
        for module, name in DOWNLOAD_ROUTES:
            patch.setattr(module, name, refuse_download)
        yield


@pytest.fixture(scope="module")
def random_lpips():
    with downloads_refused():  # the stand-in LPIPS never downloads
        return load_lpips(None, CPU, seed=SEED)


@pytest.fixture(scope="module")
def own_lpips():
    """lpips's own model built under the stand-in's seed."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(SEED)
        return quiet_lpips().eval()


@pytest.fixture(scope="module")
def torchvision_vgg16():
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(1)
        return torchvision.models.vgg16(weights=None).eval()


@pytest.fixture(scope="module")
def vgg16_file(torchvision_vgg16, tmp_path_factory):
    """The torchvision VGG16's state dict as torchvision saves it, less the 400 MB of the classifier's first
    layers (one classifier entry is kept: keys beyond the backbone must be ignored)."""
    state = {key: value for key, value in torchvision_vgg16.state_dict().items()
             if key.startswith("features.") or key == "classifier.6.bias"}
    path = tmp_path_factory.mktemp("vgg16") / "vgg16.pth"
    torch.save(state, path)
    return path


@pytest.fixture(scope="module")
def file_lpips(vgg16_file):
    with downloads_refused():  # the LPIPS of a local VGG16 file never downloads
        return load_lpips(vgg16_file, CPU)


def test_random_lpips_is_lpips_own_model_under_the_same_seed(random_lpips, own_lpips):
    model, name = random_lpips
    assert name == "lpips-vgg (stand-in: random VGG16 backbone, seed 0)"
    state = model.state_dict()
    for key, value in own_lpips.state_dict().items():
        assert torch.equal(state[key], value), key
    x, y = lpips_inputs(0)
    with torch.no_grad():
        assert torch.equal(model(x, y), own_lpips(x, y))
    assert not model.training and not any(p.requires_grad for p in model.parameters())


def test_lpips_heads_are_the_v01_heads_shipped_with_lpips(random_lpips):
    shipped = torch.load(lpips.__path__[0] + "/weights/v0.1/vgg.pth", map_location="cpu", weights_only=True)
    state = random_lpips[0].state_dict()
    assert len(shipped) == 5
    for key, value in shipped.items():
        assert torch.equal(state[key], value), key


def test_lpips_backbone_follows_the_seed(random_lpips):
    # (The same seed gives the same model: test_random_lpips_is_lpips_own_model_under_the_same_seed.)
    x, y = lpips_inputs(1)
    other, other_name = load_lpips(None, CPU, seed=SEED + 1)
    with torch.no_grad():
        assert not torch.allclose(other(x, y), random_lpips[0](x, y))
    assert other_name == "lpips-vgg (stand-in: random VGG16 backbone, seed 1)"


def test_lpips_loads_every_conv_of_a_torchvision_vgg16_file(file_lpips, torchvision_vgg16):
    model, name = file_lpips
    assert name == "lpips-vgg (v0.1 heads, VGG16 from vgg16.pth)"
    features = torchvision_vgg16.features
    slices = [model.net.slice1, model.net.slice2, model.net.slice3, model.net.slice4, model.net.slice5]
    convs = [(index, module) for part in slices for index, module in part.named_children()
             if isinstance(module, torch.nn.Conv2d)]
    assert len(convs) == 13  # all of VGG16's conv layers
    for index, conv in convs:
        assert torch.equal(conv.weight, features[int(index)].weight), index
        assert torch.equal(conv.bias, features[int(index)].bias), index


def test_lpips_from_a_file_equals_lpips_filled_by_hand(file_lpips, torchvision_vgg16, own_lpips):
    by_hand = copy.deepcopy(own_lpips)  # a random backbone, overwritten below module by module
    for part in (by_hand.net.slice1, by_hand.net.slice2, by_hand.net.slice3, by_hand.net.slice4, by_hand.net.slice5):
        for index, module in part.named_children():
            module.load_state_dict(torchvision_vgg16.features[int(index)].state_dict())
    x, y = lpips_inputs(2)
    with torch.no_grad():
        expected = by_hand(x, y)
        assert torch.allclose(file_lpips[0](x, y), expected, rtol=1e-6, atol=0)
        assert (expected > 0).all()


def test_lpips_without_its_file_names_the_path_and_the_config_key(tmp_path):
    missing = tmp_path / "nowhere" / "vgg16-397923af.pth"
    with pytest.raises(FileNotFoundError, match="vgg16") as caught:
        load_lpips(missing, CPU)
    assert str(missing) in str(caught.value)


def test_lpips_refuses_a_file_that_is_not_a_vgg16_state_dict(tmp_path):
    alexnet_like = tmp_path / "other.pth"
    torch.save({"features.0.weight": torch.zeros(64, 3, 11, 11), "features.0.bias": torch.zeros(64)}, alexnet_like)
    with pytest.raises(ValueError, match="not torchvision's vgg16 state dict"):
        load_lpips(alexnet_like, CPU)


# ---------------------------------------------------------------- the stage


def tiny_vae() -> AutoencoderKL:
    """A random AutoencoderKL with SD's latents (4 channels, f8) at toy widths."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(SEED)
        vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, layers_per_block=1, norm_num_groups=4,
                            down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                            block_out_channels=(8, 8, 8, 8), sample_size=IMAGE_SIZE)
    return vae.eval().requires_grad_(False)


@pytest.fixture(scope="module")
def val_csv(tmp_path_factory):
    """Six smooth non-square validation images (150 x 120 and 120 x 150) and one corrupt file, in the CSV."""
    folder = tmp_path_factory.mktemp("val")
    paths = []
    for i in range(6):
        height, width = (120, 150) if i % 2 else (150, 120)
        path = folder / f"{i}.png"
        Image.fromarray(smooth_image(height, width, 100 + i)).save(path)
        paths.append(str(path))
    corrupt = folder / "corrupt.jpg"
    corrupt.write_bytes(b"not a JPEG at all")
    paths.insert(3, str(corrupt))
    csv = folder / "val.csv"
    pd.DataFrame({"img_path": paths, "class_id": 0}).to_csv(csv, index=False)
    return {"csv": csv, "images": [p for p in paths if p != str(corrupt)], "corrupt": str(corrupt)}


@pytest.fixture(scope="module")
def stand_in():
    # The stand-in Inception at a 16-d pool vector: scipy's sqrtm of the default 128-d covariances of a few images
    # (singular) takes a second per Fréchet distance.
    return StandInFeatures(CPU, seed=SEED, pool_dim=16)


def run_stage(val_csv, stand_in, lpips_pair, vae=None, **options) -> dict:
    model, name = lpips_pair
    return reconstruction_metrics(val_csv["csv"], IMAGE_SIZE, vae or tiny_vae(), stand_in, model, batch_size=4,
                                  num_workers=0, device=CPU, lpips_name=name, **options)


def test_stage_reports_every_metric_and_names_the_skipped_file(val_csv, stand_in, random_lpips, caplog):
    result = run_stage(val_csv, stand_in, random_lpips)
    assert set(result) == {"images", "skipped", "psnr", "ssim", "lpips", "rfid", "feature_network", "lpips_network",
                           "image_size", "images_per_class"}
    assert result["images"] == 6 and result["skipped"] == [val_csv["corrupt"]]
    assert val_csv["corrupt"] in caplog.text
    assert result["feature_network"] == stand_in.name and result["image_size"] == IMAGE_SIZE
    assert result["lpips_network"] == "lpips-vgg (stand-in: random VGG16 backbone, seed 0)"
    # A random VAE reconstructs badly: finite, clearly imperfect scores.
    assert 0 < result["psnr"] < 40 and -1 < result["ssim"] < 0.9 and result["lpips"] > 0 and result["rfid"] > 0


def test_stage_takes_the_first_images_of_each_class_when_capped(val_csv, stand_in, random_lpips, tmp_path):
    """images_per_class = 2 of a CSV whose class 0 holds rows 0-3 (the corrupt file is row 3) and class 1 rows 4-6:
    rows 0, 1, 4 and 5, scored as a CSV of those rows alone is."""
    table = pd.read_csv(val_csv["csv"]).assign(class_id=[0, 0, 0, 0, 1, 1, 1])
    capped_csv, chosen_csv = tmp_path / "capped.csv", tmp_path / "chosen.csv"
    table.to_csv(capped_csv, index=False)
    table.iloc[[0, 1, 4, 5]].to_csv(chosen_csv, index=False)
    capped = run_stage({"csv": capped_csv}, stand_in, random_lpips, images_per_class=2)
    chosen = run_stage({"csv": chosen_csv}, stand_in, random_lpips)
    assert capped["images"] == 4 and capped["skipped"] == [] and capped["images_per_class"] == 2
    assert {key: capped[key] for key in ("psnr", "ssim", "lpips", "rfid")} == \
        {key: chosen[key] for key in ("psnr", "ssim", "lpips", "rfid")}


def test_stage_scores_the_vae_square_against_its_decoded_png(val_csv, stand_in, random_lpips):
    """The stage's results against a route of their own: the square cropped from the PIL image, the VAE run on it
    directly, the decoded images quantised as PNGs, scikit-image's PSNR and SSIM, and the Fréchet distance of the
    two sets' pool features."""
    vae = tiny_vae()
    crop = transforms.Compose([transforms.Resize(IMAGE_SIZE, interpolation=transforms.InterpolationMode.BICUBIC),
                               transforms.CenterCrop(IMAGE_SIZE)])
    originals = np.stack([np.asarray(crop(Image.open(path).convert("RGB"))) for path in val_csv["images"]])
    with torch.no_grad():
        decoded = vae.decode(vae.encode(as_batch(list(originals)) / 127.5 - 1).latent_dist.mean).sample
        decoded = ((decoded.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
        lpipses = random_lpips[0](as_batch(list(originals)) / 127.5 - 1, as_batch(list(decoded)) / 127.5 - 1)
    psnrs = [peak_signal_noise_ratio(o, d, data_range=255) for o, d in zip(originals, decoded)]
    ssims = [structural_similarity(o, d, channel_axis=2, gaussian_weights=True, sigma=1.5,
                                   use_sample_covariance=False, data_range=255) for o, d in zip(originals, decoded)]
    rfid = frechet_distance(*feature_statistics(stand_in.features(originals)["pool"]),
                            *feature_statistics(stand_in.features(decoded)["pool"]))
    result = run_stage(val_csv, stand_in, random_lpips, vae)
    assert result["psnr"] == pytest.approx(np.mean(psnrs), abs=1e-3)
    assert result["ssim"] == pytest.approx(np.mean(ssims), abs=1e-4)
    assert result["lpips"] == pytest.approx(lpipses.mean().item(), abs=1e-4)
    assert result["rfid"] == pytest.approx(rfid, rel=1e-3)


def test_stage_of_an_exact_reconstruction_scores_perfectly(val_csv, stand_in, random_lpips, monkeypatch):
    monkeypatch.setattr(reconstruction, "reconstruct", lambda vae, images: images)
    result = run_stage(val_csv, stand_in, random_lpips)
    assert result["psnr"] == math.inf and result["ssim"] == pytest.approx(1.0, abs=1e-12)
    assert result["lpips"] == 0.0 and abs(result["rfid"]) < 1e-6


@pytest.mark.parametrize("offset, squared_error", [(2.0, 4), (0.6, 1), (-0.4, 0)])
def test_stage_quantises_reconstructions_as_pngs(val_csv, stand_in, random_lpips, monkeypatch, offset, squared_error):
    """A reconstruction brighter by `offset` levels everywhere is off by the offset rounded to whole levels at every
    pixel (urepa.sample.decode rounds; truncating would turn -0.4 into -1 and 0.6 into 0)."""
    monkeypatch.setattr(reconstruction, "reconstruct", lambda vae, images: images + offset / 127.5)
    expected = 10 * math.log10(255 ** 2 / squared_error) if squared_error else math.inf
    assert run_stage(val_csv, stand_in, random_lpips)["psnr"] == pytest.approx(expected)


def test_download_routes_are_refused():
    with downloads_refused(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for module, name in DOWNLOAD_ROUTES:
            with pytest.raises(AssertionError, match="attempted download"):
                getattr(module, name)("https://download.pytorch.org/models/vgg16-397923af.pth")
        # lpips's own way to its ImageNet backbone (pnet_rand=False) is among them.
        with pytest.raises(AssertionError, match="vgg16-397923af.pth"):
            lpips.LPIPS(net="vgg", verbose=False)


def test_stage_downloads_nothing(val_csv, stand_in, file_lpips):
    # (load_lpips, with and without a VGG16 file, is called under the same guard by the random_lpips and
    # file_lpips fixtures.)
    with downloads_refused():
        result = run_stage(val_csv, stand_in, file_lpips)
    assert result["images"] == 6 and result["lpips_network"] == "lpips-vgg (v0.1 heads, VGG16 from vgg16.pth)"


def test_reconstruct_decodes_the_posterior_mean_into_range():
    vae = tiny_vae()
    images = as_batch([smooth_image(64, 64, seed) for seed in range(2)]) / 127.5 - 1
    decoded = reconstruct(vae, images)
    with torch.no_grad():
        expected = vae.decode(vae.encode(images).latent_dist.mean).sample.clamp(-1, 1)
    assert decoded.shape == images.shape and torch.equal(decoded, expected)
    assert torch.equal(reconstruct(vae, images), decoded)  # deterministic: no posterior sampling
