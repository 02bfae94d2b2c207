"""Image files and the encoders' views of them (urepa.images)."""
from __future__ import annotations

import torch
from PIL import Image, ImageDraw

from urepa.images import IMAGENET_MEAN, IMAGENET_STD, dinov2_transform, vae_transform


def test_transform_sees_the_square_the_vae_encodes() -> None:
    """DINOv2's input is the VAE's centre square resized, no further crop: a 1-px frame at the border of
    that square reaches the border of DINOv2's input (a resize-256 / crop-224 view would cut it off)."""
    image = Image.new("RGB", (400, 300), (0, 0, 0))
    ImageDraw.Draw(image).rectangle([50, 0, 349, 299], outline=(255, 255, 255), width=6)  # the centre square's edge
    pixels = dinov2_transform(image_size=300, input_size=224)(image)
    assert pixels.shape == (3, 224, 224)
    white = [(1.0 - mean) / std for mean, std in zip(IMAGENET_MEAN, IMAGENET_STD)]
    for edge in (pixels[:, 0, 100], pixels[:, -1, 100], pixels[:, 100, 0], pixels[:, 100, -1]):
        torch.testing.assert_close(edge, torch.tensor(white), atol=0.15, rtol=0)
    # The same square as the VAE's input, only smaller: compare at the VAE's size, unnormalised.
    vae_view = (vae_transform(300)(image) + 1) / 2
    dino_view = pixels * torch.tensor(IMAGENET_STD)[:, None, None] + torch.tensor(IMAGENET_MEAN)[:, None, None]
    downsized = torch.nn.functional.interpolate(vae_view[None], size=224, mode="bicubic", antialias=True)[0]
    assert (dino_view - downsized.clamp(0, 1)).abs().mean() < 0.02
    assert dinov2_transform(image_size=300, input_size=224)(Image.new("L", (300, 300), 7)).shape == (3, 224, 224)
    assert dinov2_transform(image_size=128, input_size=56)(image).shape == (3, 56, 56)
