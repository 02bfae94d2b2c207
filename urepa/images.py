"""Image files and the views each encoder sees: opening a file as 8-bit RGB whatever its mode (refusing an unusable
one), the SD-VAE's square in [-1, 1] and DINOv2's view of that same square."""
from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image
from torchvision import transforms

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


# Smaller images carry too little to encode at 512 px or to score at 299 px: such a file is treated as unusable,
# like an unreadable one (ImageNet's smallest real images are well above this).
MIN_IMAGE_SIDE = 32


# Pillow's 16-bit modes (a 16-bit PNG or TIFF opens as one of these, or as "I"). Pillow's own convert("RGB") clips
# their 0-65535 values at 255: a white image.
SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N")
ALPHA_MODES = ("LA", "La", "PA", "RGBA", "RGBa")


class UnusableImage(ValueError):
    """An image file that opens but cannot be used: too small, or with no defined 8-bit reading."""


def open_rgb(path: str | Path) -> Image.Image:
    """An image file as a fully decoded RGB image; raises, saying why, for an unreadable or unusable file."""
    with Image.open(path) as image:
        if min(image.size) < MIN_IMAGE_SIDE:
            raise UnusableImage(f"{image.size[0]}x{image.size[1]} px is smaller than {MIN_IMAGE_SIDE} px on a side")
        return to_8bit_rgb(image)


def to_8bit_rgb(image: Image.Image) -> Image.Image:
    """`image` as 8-bit RGB, whatever its mode: 16-bit grey scaled by 255/65535 (rounded), transparency composited
    over white (a transparent pixel's colour is undefined: often black), palette, bilevel, grey and CMYK as Pillow
    converts them (CMYK: (255 - C)(255 - K)/255). A 32-bit integer image outside 0-65535, or a float image, has no
    defined 8-bit reading: refused as unusable."""
    mode = image.mode
    if mode in SIXTEEN_BIT_MODES or mode == "I":
        values = np.asarray(image, dtype=np.int64)
        if values.size and (values.min() < 0 or values.max() > 65535):
            raise UnusableImage(f"a 32-bit integer image with values {values.min()}..{values.max()}, outside the "
                                f"16-bit range: no defined 8-bit reading")
        return Image.fromarray(np.rint(values / 257).astype(np.uint8), mode="L").convert("RGB")
    if mode == "F":
        raise UnusableImage("a 32-bit float image: no defined 8-bit reading")
    if mode in ALPHA_MODES or (mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        return Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba).convert("RGB")
    return image.convert("RGB")


def image_batch(paths, transform):
    """The images at `paths`, each opened as RGB and `transform`ed to a tensor, stacked [len(paths), ...]."""
    import torch

    return torch.stack([transform(open_rgb(path)) for path in paths])


def vae_transform(image_size: int) -> transforms.Compose:
    """Shorter side to `image_size` (bicubic), centre crop, scale to [-1, 1] as SD-1.5 was trained."""
    return transforms.Compose([
        transforms.Resize(image_size, interpolation=transforms.InterpolationMode.BICUBIC, antialias=True),
        transforms.CenterCrop(image_size),
        transforms.ToTensor(),
        transforms.Normalize([0.5], [0.5]),
    ])


def dinov2_transform(image_size: int, input_size: int = 224) -> transforms.Compose:
    """DINOv2's view of exactly the square the VAE encodes: shorter side to `image_size`, centre crop
    (as `vae_transform`), then that square resized to the encoder's `input_size`, no further crop
    (as REPA feeds its encoder). DINOv2's own eval transform (resize 256, crop 224) would see only the
    central 87.5 %, so border tokens would sit up to one token away from their U-Net counterparts.
    Bicubic with antialiasing, ImageNet mean/std."""
    bicubic = transforms.InterpolationMode.BICUBIC
    return transforms.Compose([
        transforms.Lambda(to_rgb),
        transforms.Resize(image_size, interpolation=bicubic, antialias=True),
        transforms.CenterCrop(image_size),
        transforms.Resize((input_size, input_size), interpolation=bicubic, antialias=True),
        transforms.ToTensor(),
        transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD),
    ])


def dinov2_view(image_size: int, input_size: int) -> str:
    """The view a token cache records and training checks: which square, seen at which size."""
    return f"vae-square {image_size}px resized to {input_size}px, no crop"


def to_rgb(image: Image.Image) -> Image.Image:
    # ImageNet holds a few grayscale and CMYK JPEGs; the encoder takes three channels.
    return image if image.mode == "RGB" else image.convert("RGB")
