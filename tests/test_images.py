"""Image files and the encoders' views of them (urepa.images)."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

from urepa.images import (IMAGENET_MEAN, IMAGENET_STD, UnusableImage, dinov2_transform, open_rgb, to_8bit_rgb,
                          vae_transform)

# One 32 x 32 image per mode, saved in a format that keeps the mode, with what its pixels must read as in 8-bit RGB
# by hand: (pixel array or Image, file suffix, expected RGB of the left and right halves).
GREY16 = np.concatenate([np.full((32, 16), 1000, np.uint16), np.full((32, 16), 65535, np.uint16)], axis=1)


def halves(left, right) -> np.ndarray:
    """A 32 x 32 RGB array: `left` on the left half, `right` on the right."""
    return np.concatenate([np.broadcast_to(np.array(left, np.uint8), (32, 16, 3)),
                           np.broadcast_to(np.array(right, np.uint8), (32, 16, 3))], axis=1)


def two_tone(mode: str, left, right) -> Image.Image:
    image = Image.new(mode, (32, 32), left)
    image.paste(right, (16, 0, 32, 32))
    return image


def palette_image(transparent: bool) -> Image.Image:
    image = Image.new("P", (32, 32), 0)
    image.putpalette([200, 10, 30, 5, 250, 60] + [0] * 762)
    image.paste(1, (16, 0, 32, 32))
    if transparent:
        image.info["transparency"] = 1
    return image


MODES = {
    "1": (two_tone("1", 0, 1), ".png", halves([0, 0, 0], [255, 255, 255])),
    "L": (two_tone("L", 40, 220), ".png", halves([40] * 3, [220] * 3)),
    "LA": (two_tone("LA", (40, 255), (220, 0)), ".png", halves([40] * 3, [255] * 3)),  # transparent -> white
    "P": (palette_image(False), ".png", halves([200, 10, 30], [5, 250, 60])),
    "P+transparency": (palette_image(True), ".png", halves([200, 10, 30], [255, 255, 255])),
    "RGBA": (two_tone("RGBA", (10, 20, 30, 255), (200, 100, 0, 128)), ".png",
             # half-transparent over white: 255 + (c - 255) * 128 / 255
             halves([10, 20, 30], [int(np.rint(255 + (c - 255) * 128 / 255)) for c in (200, 100, 0)])),
    "CMYK": (two_tone("CMYK", (100, 50, 0, 60), (0, 0, 0, 0)), ".jpg", None),  # lossy: compared with a tolerance
    "I;16": (Image.fromarray(GREY16), ".png", halves([4] * 3, [255] * 3)),  # 1000 / 257 = 3.9 -> 4
    "I": (Image.fromarray(GREY16.astype(np.int32), mode="I"), ".tif", halves([4] * 3, [255] * 3)),
}


@pytest.mark.parametrize("mode", MODES)
def test_every_image_mode_opens_as_the_8_bit_rgb_it_shows(mode, tmp_path):
    image, suffix, expected = MODES[mode]
    path = tmp_path / f"image{suffix}"
    image.save(path)
    opened = open_rgb(path)
    assert opened.mode == "RGB" and opened.size == (32, 32)
    pixels = np.asarray(opened)
    if mode == "CMYK":  # (255 - C)(255 - K) / 255 per channel, through JPEG's loss
        cmyk = np.array([[100, 50, 0, 60], [0, 0, 0, 0]], float)
        by_hand = (255 - cmyk[:, :3]) * (255 - cmyk[:, 3:]) / 255
        assert np.abs(pixels[16, [4, 28]].astype(float) - by_hand).max() <= 3
    else:
        assert np.array_equal(pixels, expected), (pixels[0, 0], pixels[0, -1])


def test_a_palette_image_with_alpha_is_composited_over_white():
    """PA (no file format writes it; Pillow makes it from P): the decoded image's conversion."""
    image = palette_image(False).convert("PA")
    image.putalpha(two_tone("L", 255, 0))
    assert np.array_equal(np.asarray(to_8bit_rgb(image)), halves([200, 10, 30], [255, 255, 255]))


def test_a_16_bit_png_is_not_read_as_a_white_image(tmp_path):
    """The bug this guards against: Pillow's convert("RGB") of a 16-bit grey image clips at 255."""
    path = tmp_path / "grey16.png"
    Image.fromarray(np.full((40, 40), 30000, np.uint16)).save(path)
    assert Image.open(path).convert("RGB").getpixel((0, 0)) == (255, 255, 255)
    assert open_rgb(path).getpixel((0, 0)) == (117, 117, 117)  # 30000 / 257 = 116.7


@pytest.mark.parametrize("image, reason", [
    (Image.fromarray(np.full((32, 32), 0.5, np.float32)), "float image"),
    (Image.fromarray(np.full((32, 32), 70000, np.int32), mode="I"), "outside the 16-bit range"),
    (Image.new("RGB", (31, 64)), "smaller than 32 px"),
])
def test_an_image_without_a_defined_8_bit_reading_is_refused_as_unusable(image, reason, tmp_path):
    path = tmp_path / "image.tif"
    image.save(path)
    with pytest.raises(UnusableImage, match=reason):
        open_rgb(path)


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
