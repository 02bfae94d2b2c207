"""Stages 5-6 glue: FID-vs-step targets, the held-out batch, fid.json and the report page."""
import json
import re

import pandas as pd
import pytest
from PIL import Image

from urepa.evaluate import add_targets, cfg_sweep, fid_curve, held_out_rows, steps_to_target
from urepa.report import fid_summary, plot_cfg_sweeps, plot_fid_curves, render_report

STAND_IN = "stand-in (random conv net, seed 0; NOT Inception)"


def test_steps_to_target_is_the_first_step_at_or_below_it():
    points = [{"step": 10, "fid": 30.0}, {"step": 20, "fid": 18.0}, {"step": 30, "fid": 20.0}]
    assert steps_to_target(points, 20.0) == 20
    assert steps_to_target(points, 5.0) is None
    assert steps_to_target(points, None) is None


def test_default_target_is_the_baselines_final_fid():
    curves = {"baseline": {"points": [{"step": 10, "fid": 30.0}, {"step": 20, "fid": 25.0}]},
              "urepa": {"points": [{"step": 10, "fid": 24.0}, {"step": 20, "fid": 20.0}]}}
    assert add_targets(curves, None) == 25.0
    assert curves["urepa"]["steps_to_target"] == 10 and curves["baseline"]["steps_to_target"] == 20
    assert add_targets(curves, 22.0) == 22.0 and curves["urepa"]["steps_to_target"] == 20


def test_held_out_batch_is_class_balanced_fixed_and_passes_over_unusable_images(tmp_path, caplog):
    paths = [_png(tmp_path / f"{i}.png", (i, i, i)) for i in range(12)]
    (tmp_path / "1.png").write_bytes(b"not a png")               # class 0's second image: damaged
    Image.new("RGB", (1, 1)).save(tmp_path / "6.png")          # class 1's first image: 1x1
    table = pd.DataFrame({"id": range(12), "img_path": paths, "class_id": [0] * 6 + [1] * 3 + [2] * 3, "synset": "s"})
    table.to_csv(tmp_path / "val.csv", index=False)
    skipped = []
    rows = held_out_rows(tmp_path / "val.csv", 6, skipped)
    assert rows["class_id"].value_counts().tolist() == [2, 2, 2]
    assert rows["id"].tolist() == [0, 9, 7, 10, 2, 8]  # rank-major; a later image of the class steps in
    assert sorted(skipped) == sorted([paths[1], paths[6]]) and paths[1] in caplog.text
    assert rows.equals(held_out_rows(tmp_path / "val.csv", 6))


def _png(path, colour):
    Image.new("RGB", (40, 36), colour).save(path)
    return str(path)


@pytest.fixture
def run_files(tmp_path):
    runs, curves, sweeps, metrics = {}, {}, {}, {}
    for i, ablation in enumerate(["urepa", "baseline"]):
        d = tmp_path / ablation
        d.mkdir()
        m = {"fid": 10.0 + i, "sfid": 20.0, "kid_mean": 0.01, "kid_std": 0.001, "inception_score_mean": 3.0,
             "inception_score_std": 0.1, "precision": 0.5, "recall": 0.4, "num_generated": 24, "num_reference": 32,
             "feature_network": STAND_IN, "checkpoint_step": 120, "weights": "EMA",
             "sampling": {"sampler": "dpmpp", "steps": 25, "cfg_scale": 7.5, "guidance_low": 0.0, "guidance_high": 0.7}}
        (d / "metrics.json").write_text(json.dumps(m))
        metrics[ablation] = m
        points = []
        for step in (40, 80):
            point = {**m, "fid": m["fid"] + 100 / step, "checkpoint_step": step, "num_generated": 12}
            (d / f"point-{step}.json").write_text(json.dumps(point))
            points.append(d / f"point-{step}.json")
        curves[ablation] = fid_curve(points)
        # CFG sweep written in the order Snakemake lists the scales; FID lowest at 3.0 for urepa, 2.0 for baseline.
        sweep_files = []
        for scale, fid in ((7.5, 30.0), (1.5, 14.0), (3.0, 9.0 + 2 * i), (2.0, 10.0)):
            point = {**m, "fid": fid, "precision": 0.1 * scale, "num_generated": 12,
                     "sampling": {**m["sampling"], "cfg_scale": scale}}
            (d / f"cfg-{scale:g}.json").write_text(json.dumps(point))
            sweep_files.append(d / f"cfg-{scale:g}.json")
        sweeps[ablation] = cfg_sweep(sweep_files)
        (d / "alignment.json").write_text(json.dumps({"layer": "mid", "images": 8, "has_head": ablation == "urepa",
                                                      "timesteps": [{"timestep": 500, "cknna": 0.3, "cca": 0.5}]}))
        runs[ablation] = {"metrics": str(d / "metrics.json"), "alignment": str(d / "alignment.json"),
                          "loss_curve": _png(d / "loss.png", "red"), "tsne": _png(d / "tsne.png", "green"),
                          "grid": _png(d / "grid.png", "blue")}
    return runs, curves, sweeps, metrics


def test_cfg_sweep_orders_scales_and_finds_the_lowest_fid(run_files):
    _, _, sweeps, _ = run_files
    assert [p["cfg_scale"] for p in sweeps["urepa"]["points"]] == [1.5, 2.0, 3.0, 7.5]
    assert [p["fid"] for p in sweeps["urepa"]["points"]] == [14.0, 10.0, 9.0, 30.0]
    assert [p["precision"] for p in sweeps["urepa"]["points"]] == pytest.approx([0.15, 0.2, 0.3, 0.75])
    assert sweeps["urepa"]["best"]["cfg_scale"] == 3.0 and sweeps["urepa"]["best"]["fid"] == 9.0
    assert sweeps["baseline"]["best"]["cfg_scale"] == 2.0 and sweeps["baseline"]["best"]["fid"] == 10.0
    assert sweeps["urepa"]["best"]["num_generated"] == 12


def test_fid_curve_collects_points_in_step_order(run_files):
    _, curves, _, _ = run_files
    assert [p["step"] for p in curves["urepa"]["points"]] == [40, 80]
    assert curves["urepa"]["points"][0]["num_samples"] == 12


def test_fid_summary_keeps_the_headline_numbers(run_files):
    _, _, sweeps, metrics = run_files
    summary = fid_summary(metrics, sweeps)
    assert set(summary) == {"urepa", "baseline"}
    assert summary["urepa"]["cfg_sweep_best"]["fid"] == 9.0 and summary["urepa"]["cfg_sweep_best"]["cfg_scale"] == 3.0
    assert summary["urepa"]["fid"] == 10.0 and summary["urepa"]["num_generated"] == 24
    assert summary["baseline"]["sampling"]["steps"] == 25 and summary["urepa"]["checkpoint_step"] == 120


def test_report_renders_every_section_self_contained(run_files, tmp_path):
    runs, curves, sweeps, _ = run_files
    add_targets(curves, None)
    plot_fid_curves(curves, tmp_path / "curves.png")
    plot_cfg_sweeps(sweeps, tmp_path / "sweep.png")
    render_report("smoke", runs, curves, sweeps, tmp_path / "curves.png", tmp_path / "sweep.png",
                  tmp_path / "report.html")
    page = (tmp_path / "report.html").read_text()
    for heading in ("Ablations", "Guidance scale", "FID vs training step", "Training losses", "Alignment with DINOv2",
                    "Samples"):
        assert f"<h2>{heading}</h2>" in page
    assert "Stand-in feature network" in page
    # FID curve + CFG sweep + 2 runs x (loss curve, t-SNE, sample grid), all embedded: no file references
    assert len(re.findall(r'src="data:image/png;base64,', page)) == 8
    assert "src=\"/" not in page and "file://" not in page
    cells = [re.findall(r"<td>([^<]*)</td>", row) for row in re.findall(r"<tr>(.*?)</tr>", page, re.S)]
    cells = [row for row in cells if row]
    assert [row[:2] for row in cells[:2]] == [["urepa", "10"], ["baseline", "11"]]  # ablation, FID
    header = re.findall(r"<th>([^<]*)</th>", page.split("</thead>")[0])
    assert cells[0][header.index("ΔFID vs baseline")] == "-1" and cells[1][header.index("ΔFID vs baseline")] == "–"
    assert cells[0][header.index("best-CFG FID")] == "9" and cells[0][header.index("at CFG")] == "3"
    # the sweep table: 2 runs x 4 scales, in scale order, best marked
    sweep_rows = cells[2:10]
    assert [row[:2] for row in sweep_rows[:4]] == [["urepa", "1.5"], ["urepa", "2"], ["urepa", "3"], ["urepa", "7.5"]]
    assert [row[-1] for row in sweep_rows[:4]] == ["", "", "✓", ""]
    # FID-vs-step: the target is the baseline's final FID (11 + 100/80); urepa reaches it at step 80
    assert cells[10][:3] == ["urepa", "12.25", "80"] and cells[11][:3] == ["baseline", "12.25", "80"]


def test_reference_statistics_skip_and_name_unusable_validation_images(tmp_path, caplog):
    import numpy as np

    from urepa.evaluate import reference_statistics
    from urepa.metrics import StandInFeatures, extract_features, load_statistics

    good = [_png(tmp_path / f"{i}.png", (40 * i, 20, 200 - 30 * i)) for i in range(5)]
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
    from urepa.evaluate import SquareImages
    arrays = np.stack([SquareImages(good, 32)[i][0] for i in range(5)])
    expected = extract_features(network, [arrays])
    np.testing.assert_allclose(stats["pool_mu"], expected["pool"].astype(np.float64).mean(axis=0), rtol=1e-5)
