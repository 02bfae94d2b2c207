"""The image discriminator of REPA-E's VAE loss (off by default here): a PatchGAN and its hinge losses.

REPA-E's released code builds pix2pix's N-layer PatchGAN with BatchNorm (`use_actnorm=False` in its
`loss/losses.py`, although its paper's lineage, taming-transformers, offers ActNorm), initialised N(0, 0.02) for
convolutions and N(1, 0.02) for the BatchNorm scales. The layers sit in one `main` sequence in that order, so a
state dict saved from REPA-E's discriminator loads here. It scores overlapping patches: 30 x 30 logits for a
256 px image with three layers.
"""
from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F


class PatchDiscriminator(nn.Module):
    """Logits [B, 1, h, w], one per receptive-field patch of [B, channels, H, W] images in [0, 1] (the range REPA-E
    feeds it, so its checkpoint scores the inputs it was trained on)."""

    def __init__(self, channels: int = 3, width: int = 64, layers: int = 3):
        super().__init__()
        stack = [nn.Conv2d(channels, width, 4, stride=2, padding=1), nn.LeakyReLU(0.2, True)]
        multiple = 1
        for layer in range(1, layers + 1):
            previous, multiple = multiple, min(2 ** layer, 8)
            # The last hidden layer keeps the resolution (stride 1) so the patches overlap more.
            stride = 2 if layer < layers else 1
            stack += [nn.Conv2d(width * previous, width * multiple, 4, stride=stride, padding=1, bias=False),
                      nn.BatchNorm2d(width * multiple), nn.LeakyReLU(0.2, True)]
        stack.append(nn.Conv2d(width * multiple, 1, 4, stride=1, padding=1))
        self.main = nn.Sequential(*stack)
        self.apply(_initialise)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.main(images)


def _initialise(module: nn.Module) -> None:
    if isinstance(module, nn.Conv2d):
        nn.init.normal_(module.weight, 0.0, 0.02)
    elif isinstance(module, nn.BatchNorm2d):
        nn.init.normal_(module.weight, 1.0, 0.02)
        nn.init.zeros_(module.bias)


def hinge_discriminator_loss(logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
    """The discriminator's hinge loss: (E[relu(1 - D(x))] + E[relu(1 + D(x_hat))]) / 2."""
    return 0.5 * (F.relu(1.0 - logits_real).mean() + F.relu(1.0 + logits_fake).mean())


def generator_loss(logits_fake: torch.Tensor) -> torch.Tensor:
    """The VAE's adversarial term: -E[D(x_hat)]."""
    return -logits_fake.mean()
