"""Shared fixtures: the smoke tier's generated inputs, built once per test session."""
from pathlib import Path

import pytest

from urepa import smoke

REPO = Path(__file__).resolve().parents[1]
SCHEMA = REPO / "workflow" / "schemas" / "config.schema.yaml"
SMOKE_IMAGE_SIZE = 128


@pytest.fixture(scope="session")
def smoke_inputs(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("smoke_inputs")
    return {
        "imagenet": smoke.make_imagenet_tree(root / "imagenet", num_classes=3, train_per_class=10,
                                             val_per_class=4, seed=0),
        "sd15": smoke.make_tiny_sd15(root / "sd15", SMOKE_IMAGE_SIZE, seed=0),
        "dinov2": smoke.make_tiny_dinov2(root / "dinov2", seed=0),
    }
