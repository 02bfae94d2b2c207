"""Image files and the views each encoder sees: opening a file as RGB (refusing an unusable one), the SD-VAE's
square in [-1, 1] and DINOv2's view of that same square."""
from __future__ import annotations

from pathlib import Path

from PIL import Image
from torchvision import transforms

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


# Smaller images carry too little to encode at 512 px or to score at 299 px: such a file is treated as unusable,
# like an unreadable one (ImageNet's smallest real images are well above this).
MIN_IMAGE_SIDE = 32


class UnusableImage(ValueError):
    """An image file that opens but is too small to use."""


def open_rgb(path: str | Path) -> Image.Image:
    """An image file as a fully decoded RGB image; raises, saying why, for an unreadable or too small file."""
    with Image.open(path) as image:
        if min(image.size) < MIN_IMAGE_SIDE:
            raise UnusableImage(f"{image.size[0]}x{image.size[1]} px is smaller than {MIN_IMAGE_SIDE} px on a side")
        return image.convert("RGB")


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
