"""The feature networks the sample-quality metrics are computed on (urepa.metrics holds the formulas).

Two networks with the same interface:
- `InceptionFeatures`: clean-fid's / StyleGAN2-ADA's TorchScript port of the TF Inception graph
  (`inception-2015-12-05.pt`), loaded from a local folder, images resized the clean-fid "clean" way.
  Numbers are comparable with published FID / sFID (ADM's evaluator) / IS / precision-recall.
- `StandInFeatures`: a fixed-seed random conv net for the smoke tier, where no real weights exist.
  The same code runs on its outputs, but the numbers mean nothing outside this repository.

Every network maps uint8 RGB images to three feature sets:
    pool    [N, D]  global-average-pooled last map (Inception pool3, 2048-d): FID, KID, precision/recall
    spatial [N, S]  first 7 channels of an intermediate map, flattened (Inception mixed_6/conv,
                    7 x 17 x 17 = 2023-d, ADM's sFID)
    logits  [N, C]  class logits (Inception: 1008-way): Inception Score
Every feature and result dict carries the network's `feature_network` string, so a stand-in number
can never be mistaken for, or compared with, an Inception one.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from cleanfid.resize import make_resizer
from torch import nn

INCEPTION_FILENAME = "inception-2015-12-05.pt"
INCEPTION_URL = ("https://nvlabs-fi-cdn.nvidia.com/stylegan2-ada-pytorch/pretrained/metrics/"
                 "inception-2015-12-05.pt")
INCEPTION_NAME = "inception-2015-12-05 (clean-fid torchscript)"
INCEPTION_SIZE = 299
# The order in which the torchscript's `layers.forward` calls its children (pool2 gives pool3).
INCEPTION_LAYERS = ("conv", "conv_1", "conv_2", "pool0", "conv_3", "conv_4", "pool1", "mixed", "mixed_1",
                    "mixed_2", "mixed_3", "mixed_4", "mixed_5", "mixed_6", "mixed_7", "mixed_8", "mixed_9",
                    "mixed_10", "pool2")
SPATIAL_CHANNELS = 7  # ADM: 7 x 17 x 17 = 2023, about the size of pool3


class CleanResize:
    """clean-fid's "clean" resize: PIL bicubic on each channel as float32, no re-quantisation.

    A class rather than clean-fid's closure so DataLoader workers can pickle it.
    Maps an RGB uint8 image [H, W, 3] to a float32 tensor [3, size, size] with values in 0..255.
    """

    def __init__(self, size: int) -> None:
        self.size = size

    def __call__(self, image: np.ndarray) -> torch.Tensor:
        resized = make_resizer("PIL", False, "bicubic", (self.size, self.size))(image)
        return torch.from_numpy(np.ascontiguousarray(resized.transpose(2, 0, 1)))


class FeatureNetwork(nn.Module):
    """Frozen feature network. `forward` takes resized float images [B, 3, S, S] in 0..255 and
    returns {"pool", "spatial", "logits"} tensors; `features` does the resize too."""

    name: str

    def __init__(self, name: str, input_size: int) -> None:
        super().__init__()
        self.name = name
        self.input_size = input_size
        self.resize = CleanResize(input_size)

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    @torch.no_grad()
    def features(self, images: np.ndarray) -> dict[str, np.ndarray]:
        """Features of a batch of RGB uint8 images [B, H, W, 3] (any H, W)."""
        return self.resized_features(torch.stack([self.resize(np.asarray(image, dtype=np.uint8))
                                                  for image in images]))

    @torch.no_grad()
    def resized_features(self, batch: torch.Tensor) -> dict[str, np.ndarray]:
        """Features of already resized images [B, 3, S, S] (values 0..255), as numpy arrays."""
        return {key: value.float().cpu().numpy() for key, value in self(batch.to(self.device)).items()}


class InceptionFeatures(FeatureNetwork):
    """The TF 2015 Inception graph as clean-fid's TorchScript, from `weights_dir/inception-2015-12-05.pt`."""

    def __init__(self, weights_dir: str | Path, device: str | torch.device = "cpu") -> None:
        super().__init__(INCEPTION_NAME, INCEPTION_SIZE)
        path = Path(weights_dir) / INCEPTION_FILENAME
        if not path.is_file():
            raise FileNotFoundError(
                f"Inception weights not found: expected {path}. This is clean-fid's / StyleGAN2-ADA's Inception "
                f"torchscript '{INCEPTION_FILENAME}'; fetch it on a machine with network access from "
                f"{INCEPTION_URL} and put it in that folder.")
        base = torch.jit.load(str(path), map_location=device).eval()
        missing = [name for name in INCEPTION_LAYERS if not hasattr(base.layers, name)]
        if missing or not hasattr(base.layers.mixed_6, "conv") or not hasattr(base, "output"):
            raise ValueError(f"{path} is not clean-fid's Inception torchscript (layers missing: {missing})")
        self.base = base
        self.requires_grad_(False)

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        x = (images.float() - 128) / 128  # clean-fid's normalisation of 0..255 inputs
        layers = self.base.layers
        for name in INCEPTION_LAYERS:
            layer = getattr(layers, name)
            if name == "mixed_6":
                # mixed_6/conv is one branch of mixed_6: tap it on the way, in the same pass.
                spatial = layer.conv(x)[:, :SPATIAL_CHANNELS]
            x = layer(x)
        pool = x.reshape(len(x), -1)
        # The TF graph is NHWC: flatten as (h, w, c), as ADM's evaluator does, so that sFID statistics
        # are interchangeable with those of ADM's reference batches.
        spatial = spatial.permute(0, 2, 3, 1).reshape(len(spatial), -1)
        # No output bias: the IS convention of improved-gan, ADM and StyleGAN2-ADA (`no_output_bias=True`).
        logits = F.linear(pool, self.base.output.weight)
        return {"pool": pool, "spatial": spatial, "logits": logits}


class StandInFeatures(FeatureNetwork):
    """A random, fixed-seed conv net standing in for Inception where no real weights exist (smoke tier).

    Shaped like the real thing in miniature: a strided trunk, a spatial tap (first 7 channels of an
    8 x 8 map: 448-d), a pooled vector (`pool_dim`) and a bias-free classifier (`num_classes` logits).
    """

    def __init__(self, device: str | torch.device = "cpu", seed: int = 0, input_size: int = 64,
                 pool_dim: int = 128, num_classes: int = 10) -> None:
        super().__init__(f"stand-in (random conv net, seed {seed}; NOT Inception — numbers are not "
                         f"comparable to published FID)", input_size)
        with torch.random.fork_rng(devices=[]):  # deterministic weights without touching the caller's RNG
            torch.manual_seed(seed)
            self.trunk = nn.Sequential(
                nn.Conv2d(3, 16, 3, stride=2, padding=1), nn.ReLU(),
                nn.Conv2d(16, 32, 3, stride=2, padding=1), nn.ReLU(),
                nn.Conv2d(32, 64, 3, stride=2, padding=1), nn.ReLU())
            self.spatial_branch = nn.Sequential(nn.Conv2d(64, 8, 1), nn.ReLU())
            self.head = nn.Sequential(nn.Conv2d(64, pool_dim, 3, stride=2, padding=1), nn.ReLU())
            self.classifier = nn.Linear(pool_dim, num_classes, bias=False)
            for module in self.modules():
                if isinstance(module, nn.Conv2d):
                    # He init keeps activations at unit scale through the ReLUs (PyTorch's default
                    # shrinks them layer by layer), so distances are not swamped by the eps in FID.
                    nn.init.kaiming_normal_(module.weight, nonlinearity="relu")
                    nn.init.zeros_(module.bias)
            # Unit-variance weights spread the logits enough that the stand-in IS is not pinned at 1.
            nn.init.normal_(self.classifier.weight)
        self.requires_grad_(False).eval().to(device)

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        x = self.trunk((images.float() - 128) / 128)
        spatial = self.spatial_branch(x)[:, :SPATIAL_CHANNELS].permute(0, 2, 3, 1).flatten(1)
        pool = self.head(x).mean(dim=(2, 3))
        return {"pool": pool, "spatial": spatial, "logits": self.classifier(pool)}


def build_feature_network(kind: str, weights_dir: str | Path | None = None,
                          device: str | torch.device = "cpu") -> FeatureNetwork:
    """`kind` "inception" (needs `weights_dir` holding inception-2015-12-05.pt) or "stand-in"."""
    if kind == "inception":
        if weights_dir is None:
            raise ValueError(f"the Inception feature network needs weights_dir: a folder holding {INCEPTION_FILENAME}")
        return InceptionFeatures(weights_dir, device)
    if kind == "stand-in":
        return StandInFeatures(device)
    raise ValueError(f"unknown feature network {kind!r}: expected 'inception' or 'stand-in'")
