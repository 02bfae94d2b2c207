"""urepa.curves: when a FID-vs-step curve reaches its target, the curves and CFG sweeps gathered from the metrics
files, and that the module loads without torch (the light jobs that import it would pay seconds for it)."""
import subprocess
import sys

import pytest

from urepa.curves import add_targets, steps_to_target


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


def test_the_light_jobs_modules_import_no_torch():
    """What the fid_curve, cfg_sweep, fid_summary, report, summary, gather and comparison-grid jobs import, loaded in
    a fresh interpreter: torch and its kin stay out (each costs a job seconds of CPU at start)."""
    heavy = ("torch", "torchvision", "diffusers", "transformers", "scipy")
    loaded = subprocess.run(
        [sys.executable, "-c", "import sys, urepa.curves, urepa.report, urepa.summary, urepa.sample_sets; print(' '.join(sys.modules))"],
        capture_output=True, text=True, check=True).stdout.split()
    assert [name for name in heavy if name in loaded] == []
