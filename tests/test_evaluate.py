"""Stage 5's glue (urepa.evaluate): reference statistics of the validation images and the scoring of sample sets."""
import json

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from conftest import write_png
from urepa.evaluate import SquareImages, reference_statistics, score_samples
from urepa.feature_networks import StandInFeatures
from urepa.metrics import extract_features, load_statistics
from urepa.sample_sets import SampleSetError


def test_reference_statistics_skip_and_name_unusable_validation_images(tmp_path, caplog):
    good = [write_png(tmp_path / f"{i}.png", (40 * i, 20, 200 - 30 * i)) for i in range(5)]
    (tmp_path / "broken.png").write_bytes(b"\x89PNG truncated")
    Image.new("RGB", (1, 1)).save(tmp_path / "tiny.png")
    paths = good[:2] + [str(tmp_path / "broken.png")] + good[2:] + [str(tmp_path / "tiny.png")]
    pd.DataFrame({"id": range(7), "img_path": paths, "class_id": 0, "synset": "s"}).to_csv(tmp_path / "val.csv",
                                                                                          index=False)
    network = StandInFeatures()
    reference_statistics(tmp_path / "val.csv", 32, network, tmp_path / "ref.npz", batch_size=3)
    stats = load_statistics(tmp_path / "ref.npz")
    assert stats["num_images"] == 5
    assert sorted(stats["skipped"].tolist()) == sorted([str(tmp_path / "broken.png"), str(tmp_path / "tiny.png")])
    assert str(tmp_path / "broken.png") in caplog.text and "smaller than 32 px" in caplog.text
    # The statistics are those of the usable images alone.
    arrays = np.stack([SquareImages(good, 32)[i][0] for i in range(5)])
    expected = extract_features(network, [arrays])
    np.testing.assert_allclose(stats["pool_mu"], expected["pool"].astype(np.float64).mean(axis=0), rtol=1e-5)


@pytest.fixture()
def scored_set(tmp_path):
    """A finished sample set as gather_samples leaves it (3 classes x 4 images, written class by class, with its
    sampling.json), and reference statistics to score it against."""
    from urepa.metrics import save_statistics

    samples = tmp_path / "samples"
    samples.mkdir()
    for i in range(12):
        write_png(samples / f"{i:06d}.png", (20 * (i // 4), 10 * i, 255 - 20 * i))
    (samples / "sampling.json").write_text(json.dumps({"num_classes": 3, "images_per_class": 4, "seed": 0}))
    references = [write_png(tmp_path / f"ref{i}.png", (15 * i, 100, 30)) for i in range(6)]
    network = StandInFeatures()
    save_statistics(tmp_path / "ref.npz", extract_features(network, references))
    return samples, tmp_path / "ref.npz", network


def test_a_complete_sample_set_is_scored_on_every_image(scored_set):
    samples, reference, network = scored_set
    assert score_samples(samples, reference, network, 5, {})["num_generated"] == 12


@pytest.mark.parametrize("damage, named", [
    (lambda s: (s / "000005.png").unlink(), r"1 missing \(000005.png\)"),
    (lambda s: write_png(s / "000012.png", (0, 0, 0)), r"1 not of the set \(000012.png\)"),
    (lambda s: (s / "000007.png").write_bytes((s / "000007.png").read_bytes()[:60]), r"000007.png: .*truncated"),
])
def test_a_damaged_sample_set_is_named_set_aside_and_never_scored(scored_set, damage, named):
    """A missing, extra or truncated image: the error names it and the set is moved aside, so that a plain rerun of
    Snakemake regenerates it (the set is the sampling rule's output)."""
    samples, reference, network = scored_set
    damage(samples)
    with pytest.raises(SampleSetError, match=named) as error:
        score_samples(samples, reference, network, 5, {})
    assert "12 images (3 classes x 4" in str(error.value) or "truncated" in str(error.value)
    assert not samples.exists()
    (aside,) = samples.parent.glob("samples.stale-*")
    assert (aside / "sampling.json").is_file() and "run snakemake again" in str(error.value)
