"""Stage 5's glue (urepa.evaluate): reference statistics of the validation images, FID-vs-step curves and
their targets, and the CFG sweep."""
import json

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from conftest import write_png
from urepa.evaluate import SquareImages, add_targets, reference_statistics, score_samples, steps_to_target
from urepa.feature_networks import StandInFeatures
from urepa.metrics import extract_features, load_statistics
from urepa.sample_sets import SampleSetError


def test_steps_to_target_interpolates_the_first_crossing():
    points = [{"step": 10, "fid": 30.0}, {"step": 20, "fid": 18.0}, {"step": 30, "fid": 20.0}]
    # between 10 (30) and 20 (18): 10 + (30 - 20) / (30 - 18) * 10
    assert steps_to_target(points, 20.0) == {"step": pytest.approx(10 + 10 / 12 * 10), "how": "interpolated"}
    assert steps_to_target(points, 18.0) == {"step": 20.0, "how": "at_point"}
    assert steps_to_target(points, 5.0) == {"step": None, "how": "not_reached"}
    # already there at the first point: reached then or before, the curve cannot say when
    assert steps_to_target(points, 35.0) == {"step": 10.0, "how": "first_point"}
    assert steps_to_target(points, None) is None
    # a step-0 point (the pretrained model) at or below the target: reached at step 0, nothing before it
    assert steps_to_target([{"step": 0, "fid": 15.0}, {"step": 10, "fid": 30.0}], 20.0) == {"step": 0.0,
                                                                                          "how": "at_point"}


def test_default_target_is_the_baselines_final_fid():
    curves = {"baseline": {0: {"points": [{"step": 10, "fid": 30.0}, {"step": 20, "fid": 25.0}]},
                           1: {"points": [{"step": 10, "fid": 31.0}, {"step": 20, "fid": 27.0}]}},
              "urepa": {0: {"points": [{"step": 10, "fid": 24.0}, {"step": 20, "fid": 20.0}]}}}
    assert add_targets(curves, None) == 26.0  # the mean of the baseline seeds' final FIDs
    assert curves["urepa"][0]["steps_to_target"] == {"step": 10.0, "how": "first_point"}
    assert curves["baseline"][0]["steps_to_target"] == {"step": pytest.approx(18.0), "how": "interpolated"}
    assert curves["baseline"][1]["steps_to_target"]["how"] == "not_reached"
    assert add_targets(curves, 22.0) == 22.0
    assert curves["urepa"][0]["steps_to_target"] == {"step": pytest.approx(15.0), "how": "interpolated"}


def test_cfg_sweep_orders_scales_and_finds_the_lowest_fid(run_files):
    _, _, sweeps, _ = run_files
    assert [p["cfg_scale"] for p in sweeps["urepa"][0]["points"]] == [1.5, 2.0, 3.0, 7.5]
    assert [p["fid"] for p in sweeps["urepa"][0]["points"]] == [14.0, 10.0, 9.0, 30.0]
    assert [p["precision"] for p in sweeps["urepa"][0]["points"]] == pytest.approx([0.15, 0.2, 0.3, 0.75])
    assert sweeps["urepa"][0]["best"]["cfg_scale"] == 3.0 and sweeps["urepa"][0]["best"]["fid"] == 9.0
    assert sweeps["baseline"][0]["best"]["cfg_scale"] == 2.0 and sweeps["baseline"][0]["best"]["fid"] == 10.0
    assert sweeps["urepa"][0]["best"]["num_generated"] == 12


def test_fid_curve_collects_points_in_step_order(run_files):
    _, curves, _, _ = run_files
    assert [p["step"] for p in curves["urepa"][0]["points"]] == [40, 80]
    assert curves["urepa"][0]["points"][0]["num_samples"] == 12


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
