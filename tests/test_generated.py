"""Generated inputs: the image tree's sides, and the models that can be generated. (The random Inception's
architecture: tests/test_inception.py; the full-size configs: tests/test_sd15.py and tests/test_dinov2.py.)"""
import pytest
from PIL import Image

from urepa import generated


def test_image_tree_sides_are_drawn_from_the_tiers_range(tmp_path):
    root = generated.make_imagenet_tree(tmp_path, classes=2, train_images=2, val_images=1, image_sides=(540, 700))
    for path in sorted(root.rglob("*.JPEG")):
        with Image.open(path) as image:
            assert all(540 <= side < 700 for side in image.size)


def test_unknown_generated_model_is_named(tmp_path):
    with pytest.raises(ValueError, match="no generated model called 'clip'"):
        generated.make_model("clip", tmp_path, 512, True)
