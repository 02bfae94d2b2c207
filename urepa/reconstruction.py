"""VAE reconstruction metrics, as REPA-E reports them for an autoencoder: each validation image, cropped to the
square the latent cache encodes, goes through the VAE (posterior mean, then decode) and the reconstruction is
compared with the original by PSNR, SSIM, LPIPS and rFID (the Fréchet distance between the feature statistics of
the originals and of the reconstructions).

Originals and reconstructions are compared as uint8 images, the reconstruction quantised as a sample PNG is
(urepa.sample.decode), so the numbers describe images as they would be saved."""
from __future__ import annotations

import logging
import pickle
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset

from . import metrics
from .images import open_rgb, vae_transform
from .runtime import progress

log = logging.getLogger(__name__)

DATA_RANGE = 255.0  # uint8 images
# SSIM as Wang et al. 2004 and scikit-image (gaussian_weights=True, use_sample_covariance=False): a Gaussian
# window of sigma 1.5 truncated at 3.5 sigma, i.e. radius int(3.5 * 1.5 + 0.5) = 5, 11 taps.
SSIM_SIGMA = 1.5
SSIM_RADIUS = int(3.5 * SSIM_SIGMA + 0.5)
SSIM_K1, SSIM_K2 = 0.01, 0.03
VGG16_FILE = "vgg16-397923af.pth"


def psnr(originals: torch.Tensor, reconstructions: torch.Tensor) -> torch.Tensor:
    """Per-image PSNR in dB [N] (float64) of uint8-valued images given as float tensors [N, 3, H, W] in 0..255:
    10 log10(255² / MSE), the MSE taken over all pixels and channels of each image. An image reconstructed
    exactly (MSE 0) gets +inf."""
    squared_error = (originals.double() - reconstructions.double()).square()
    return 10 * torch.log10(DATA_RANGE ** 2 / squared_error.flatten(1).mean(dim=1))


def _gaussian_taps(device: torch.device) -> torch.Tensor:
    # scipy.ndimage's Gaussian kernel, which skimage's SSIM filters with.
    offsets = torch.arange(-SSIM_RADIUS, SSIM_RADIUS + 1, dtype=torch.float64, device=device)
    taps = torch.exp(-0.5 * (offsets / SSIM_SIGMA) ** 2)
    return taps / taps.sum()


def _valid_gaussian_filter(maps: torch.Tensor) -> torch.Tensor:
    """Each channel of maps [B, C, H, W] filtered by the SSIM window where the window lies wholly inside the image:
    [B, C, H - 10, W - 10]. That is exactly what skimage keeps of its reflect-padded filter output (it crops
    (win_size - 1) // 2 = 5 pixels from each side before averaging), so the padding never matters."""
    channels = maps.shape[1]
    taps = _gaussian_taps(maps.device)
    rows = F.conv2d(maps, taps.view(1, 1, 1, -1).expand(channels, 1, 1, -1), groups=channels)
    return F.conv2d(rows, taps.view(1, 1, -1, 1).expand(channels, 1, -1, 1), groups=channels)


def ssim(originals: torch.Tensor, reconstructions: torch.Tensor) -> torch.Tensor:
    """Per-image SSIM [N] (float64) of uint8-valued images given as float tensors [N, 3, H, W] in 0..255: the mean
    of the SSIM map over the region skimage keeps, averaged over the channels. Equal to
    `skimage.metrics.structural_similarity(..., gaussian_weights=True, sigma=1.5, use_sample_covariance=False,
    data_range=255, channel_axis=-1)`. Computed in float64: in float32 the variances E[x²] - E[x]² (values up
    to 255²) would lose the digits SSIM's small constant C2 = 58.5 is compared with."""
    window = 2 * SSIM_RADIUS + 1
    if min(originals.shape[-2:]) < window:
        raise ValueError(f"SSIM needs images of at least {window} x {window} px, got {tuple(originals.shape[-2:])}")
    x, y = originals.double(), reconstructions.double()
    channels = x.shape[1]
    means = _valid_gaussian_filter(torch.cat([x, y, x * x, y * y, x * y], dim=1))
    mean_x, mean_y, mean_xx, mean_yy, mean_xy = means.split(channels, dim=1)
    var_x, var_y = mean_xx - mean_x ** 2, mean_yy - mean_y ** 2
    cov_xy = mean_xy - mean_x * mean_y
    c1, c2 = (SSIM_K1 * DATA_RANGE) ** 2, (SSIM_K2 * DATA_RANGE) ** 2
    ssim_map = ((2 * mean_x * mean_y + c1) * (2 * cov_xy + c2)
                / ((mean_x ** 2 + mean_y ** 2 + c1) * (var_x + var_y + c2)))
    return ssim_map.mean(dim=(2, 3)).mean(dim=1)


def _vgg16_backbone_state(path: Path, backbone: torch.nn.Module) -> dict[str, torch.Tensor]:
    """lpips's VGG16 backbone parameters from a torchvision `vgg16` state-dict file. lpips's slice1..slice5 hold
    torchvision's `features` modules under their own index names (slice2.5 is features.5), so backbone key
    `sliceK.I.weight` is file key `features.I.weight`; the classifier's keys are not needed."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError) as error:
        raise ValueError(f"vgg16: {path} is not a readable torch state-dict file ({error})") from error
    if not isinstance(state, dict):
        raise TypeError(f"vgg16: {path} holds a {type(state).__name__}, not a torchvision vgg16 state dict")
    own = backbone.state_dict()
    wanted = {key: "features." + key.split(".", 1)[1] for key in own}
    missing = sorted(name for name in wanted.values() if name not in state)
    misshapen = sorted(name for key, name in wanted.items() if name in state and state[name].shape != own[key].shape)
    if missing or misshapen:
        raise ValueError(f"vgg16: {path} is not torchvision's vgg16 state dict ({VGG16_FILE}): "
                         f"{len(missing)} backbone keys missing {missing[:4]}, "
                         f"{len(misshapen)} of the wrong shape {misshapen[:4]}")
    return {key: state[name] for key, name in wanted.items()}


def load_lpips(vgg16_weights: str | Path | None, device: str | torch.device,
               seed: int = 0) -> tuple[torch.nn.Module, str]:
    """LPIPS-VGG with the v0.1 linear heads shipped inside the lpips package, frozen, in eval mode, on `device`;
    returns (model, name). The model takes images in [-1, 1] (lpips's `normalize=False`).

    `vgg16_weights`: torchvision's ImageNet VGG16 state-dict file (vgg16-397923af.pth, the `vgg16` config key)
    for the backbone; None: a random backbone drawn from `seed`, a stand-in for tiers without VGG weights,
    whose name says so. Nothing is ever downloaded."""
    import lpips  # a slow import (it pulls in its trainer), needed by this stage only

    path = None if vgg16_weights is None else Path(vgg16_weights)
    if path is not None and not path.is_file():
        raise FileNotFoundError(f"vgg16: VGG16 weights file {path} not found (the `vgg16` config key: torchvision's "
                                f"ImageNet VGG16 state dict {VGG16_FILE}, as vgg16(weights=VGG16_Weights."
                                f"IMAGENET1K_V1) downloads it)")
    with torch.random.fork_rng(devices=[]), warnings.catch_warnings():
        torch.manual_seed(seed)
        # pnet_rand=True: lpips 0.1.4 then builds its backbone with torchvision.models.vgg16(pretrained=False),
        # never fetching ImageNet weights from the hub. torchvision 0.29 still takes that keyword (as weights=None)
        # but warns it is deprecated; the warnings are silenced, not to suggest a download in the logs.
        warnings.filterwarnings("ignore", message=".*deprecated since 0.13", category=UserWarning)
        # pretrained=True loads the v0.1 heads from the package's own weights/v0.1/vgg.pth.
        model = lpips.LPIPS(net="vgg", pretrained=True, pnet_rand=True, verbose=False)
    if path is None:
        name = f"lpips-vgg (stand-in: random VGG16 backbone, seed {seed})"
    else:
        model.net.load_state_dict(_vgg16_backbone_state(path, model.net))
        name = f"lpips-vgg (v0.1 heads, VGG16 from {path.name})"
    return model.to(device).eval().requires_grad_(False), name


@torch.no_grad()
def reconstruct(vae, images: torch.Tensor) -> torch.Tensor:
    """Images in [-1, 1] [B, 3, H, W] encoded (the posterior mean: deterministic) and decoded by an AutoencoderKL;
    float32 in [-1, 1]. No latent scaling: the latents go straight back to the decoder."""
    latents = vae.encode(images.to(vae.device, vae.dtype)).latent_dist.mean
    return vae.decode(latents).sample.float().clamp(-1, 1)


def _uint8_values(images: torch.Tensor) -> torch.Tensor:
    """Images in [-1, 1] as the uint8 pixels a sample PNG gets (urepa.sample.decode's rule), as float 0..255."""
    return ((images.float().clamp(-1, 1) + 1) * 127.5).round()


class VaeSquares(Dataset):
    """Validation images as the latent cache sees them (urepa.images.vae_transform: square, [-1, 1]). Items are
    (tensor or None, path, problem): an unusable file is reported, not raised, so it is skipped and named
    (as urepa.evaluate.SquareImages does for the reference statistics)."""

    def __init__(self, paths: list[str], image_size: int):
        self.paths = paths
        self.transform = vae_transform(image_size)

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> tuple[torch.Tensor | None, str, str]:
        try:
            return self.transform(open_rgb(self.paths[i])), self.paths[i], ""
        except Exception as error:  # corrupt, truncated, missing, unsupported or too small file
            return None, self.paths[i], f"{type(error).__name__}: {error}"


@torch.no_grad()
def reconstruction_metrics(val_csv: str | Path, image_size: int, vae, feature_network, lpips_model, batch_size: int,
                           num_workers: int, device: str | torch.device, *, lpips_name: str,
                           images_per_class: int | None = None) -> dict:
    """PSNR, SSIM, LPIPS and rFID of the VAE's reconstructions of the validation images (`val_csv`'s img_path).

    PSNR, SSIM and LPIPS are means over images of the per-image values (PSNR averaged in dB, as REPA-E and most
    papers do; one exactly reconstructed image makes it +inf). rFID is the Fréchet distance between the pool
    feature statistics of the originals and of the reconstructions under `feature_network`. `vae`,
    `feature_network` and `lpips_model` (from `load_lpips`, named `lpips_name`) are expected on `device`.
    Unusable images are skipped, each named in the log and in the result's `skipped`. `images_per_class`: the
    first that many images of each class only (None: all), for a tier where 512 px passes on a CPU are costly."""
    table = pd.read_csv(val_csv)
    if images_per_class is not None:
        table = table.groupby("class_id", sort=False).head(images_per_class)
    paths = table["img_path"].tolist()
    loader = DataLoader(VaeSquares(paths, image_size), batch_size=batch_size, num_workers=num_workers,
                        collate_fn=list)
    skipped: list[str] = []
    per_image: dict[str, list[torch.Tensor]] = {"psnr": [], "ssim": [], "lpips": []}
    pool_features: dict[str, list[np.ndarray]] = {"originals": [], "reconstructions": []}
    for items in progress(loader, total=len(loader), desc="VAE reconstructions", unit="batch"):
        for _, path, problem in items:
            if problem:
                log.warning("skipping validation image %s: %s", path, problem)
                skipped.append(path)
        usable = [image for image, _, problem in items if not problem]
        if not usable:
            continue
        images = torch.stack(usable).to(device)
        originals = _uint8_values(images)  # exactly the pixels the VAE encodes
        reconstructions = _uint8_values(reconstruct(vae, images))
        per_image["psnr"].append(psnr(originals, reconstructions).cpu())
        per_image["ssim"].append(ssim(originals, reconstructions).cpu())
        per_image["lpips"].append(lpips_model(originals / 127.5 - 1, reconstructions / 127.5 - 1).flatten().cpu())
        for key, batch in (("originals", originals), ("reconstructions", reconstructions)):
            uint8_hwc = batch.to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
            pool_features[key].append(feature_network.features(uint8_hwc)["pool"])
    if not per_image["psnr"]:
        raise ValueError(f"no usable validation images in {val_csv} ({len(skipped)} skipped)")
    original_stats = metrics.feature_statistics(np.concatenate(pool_features["originals"]))
    reconstruction_stats = metrics.feature_statistics(np.concatenate(pool_features["reconstructions"]))
    means = {key: float(torch.cat(values).double().mean()) for key, values in per_image.items()}
    result = {"images": len(paths) - len(skipped), "skipped": skipped, **means,
              "rfid": metrics.frechet_distance(*original_stats, *reconstruction_stats),
              "feature_network": feature_network.name, "lpips_network": lpips_name, "image_size": image_size,
              "images_per_class": images_per_class}
    log.info("reconstructions of %d images at %d px (%d skipped): PSNR %.3f dB, SSIM %.4f, LPIPS %.4f, rFID %.3f "
             "(%s; %s)", result["images"], image_size, len(skipped), result["psnr"], result["ssim"], result["lpips"],
             result["rfid"], feature_network.name, lpips_name)
    return result
