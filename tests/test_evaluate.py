"""Stage 5's glue (urepa.evaluate): reference statistics of the validation images, FID-vs-step curves and
their targets, and the CFG sweep."""
import numpy as np
import pandas as pd
import pytest
from PIL import Image

from conftest import write_png
from urepa.evaluate import SquareImages, add_targets, reference_statistics, steps_to_target
from urepa.feature_networks import StandInFeatures
from urepa.metrics import extract_features, load_statistics


def test_steps_to_target_is_the_first_step_at_or_below_it():
    points = [{"step": 10, "fid": 30.0}, {"step": 20, "fid": 18.0}, {"step": 30, "fid": 20.0}]
    assert steps_to_target(points, 20.0) == 20
    assert steps_to_target(points, 5.0) is None
    assert steps_to_target(points, None) is None


def test_default_target_is_the_baselines_final_fid():
    curves = {"baseline": {0: {"points": [{"step": 10, "fid": 30.0}, {"step": 20, "fid": 25.0}]},
                           1: {"points": [{"step": 10, "fid": 31.0}, {"step": 20, "fid": 27.0}]}},
              "urepa": {0: {"points": [{"step": 10, "fid": 24.0}, {"step": 20, "fid": 20.0}]}}}
    assert add_targets(curves, None) == 26.0  # the mean of the baseline seeds' final FIDs
    assert curves["urepa"][0]["steps_to_target"] == 10 and curves["baseline"][0]["steps_to_target"] == 20
    assert curves["baseline"][1]["steps_to_target"] is None
    assert add_targets(curves, 22.0) == 22.0 and curves["urepa"][0]["steps_to_target"] == 20


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
