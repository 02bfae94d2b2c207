"""Stages 5-6 glue: FID-vs-step targets, the held-out batch, fid.json and the report page."""
import json
import re

import pandas as pd
import pytest
from PIL import Image

from urepa.evaluate import add_targets, fid_curve, held_out_rows, steps_to_target
from urepa.report import fid_summary, plot_fid_curves, render_report

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


def test_held_out_batch_is_class_balanced_and_fixed(tmp_path):
    table = pd.DataFrame({"id": range(12), "img_path": [f"{i}.png" for i in range(12)],
                          "class_id": [0] * 6 + [1] * 3 + [2] * 3, "synset": "s"})
    table.to_csv(tmp_path / "val.csv", index=False)
    rows = held_out_rows(tmp_path / "val.csv", 6)
    assert rows["class_id"].value_counts().tolist() == [2, 2, 2]
    assert rows.equals(held_out_rows(tmp_path / "val.csv", 6))


def _png(path, colour):
    Image.new("RGB", (40, 30), colour).save(path)
    return str(path)


@pytest.fixture
def run_files(tmp_path):
    runs, curves, metrics = {}, {}, {}
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
        entry = {"timestep": 500, "cknna": 0.3 - i / 10, "cknna_chance": 0.01, "cca": 0.5, "cca_components": 2,
                 "cca_pca_dims": 2, "cca_fit_images": 4, "cca_scored_images": 4, "cca_chance": -0.02}
        if ablation == "urepa":
            entry.update(head_token_cosine=0.6, head_token_cosine_chance=0.4, head_cknna=0.7, head_cknna_chance=0.03)
        (d / "alignment.json").write_text(json.dumps({"layer": "mid", "images": 8, "has_head": ablation == "urepa",
                                                      "timesteps": [entry]}))
        runs[ablation] = {"metrics": str(d / "metrics.json"), "alignment": str(d / "alignment.json"),
                          "loss_curve": _png(d / "loss.png", "red"), "tsne": _png(d / "tsne.png", "green"),
                          "grid": _png(d / "grid.png", "blue")}
    return runs, curves, metrics


def test_fid_curve_collects_points_in_step_order(run_files):
    _, curves, _ = run_files
    assert [p["step"] for p in curves["urepa"]["points"]] == [40, 80]
    assert curves["urepa"]["points"][0]["num_samples"] == 12


def test_fid_summary_keeps_the_headline_numbers(run_files):
    _, _, metrics = run_files
    summary = fid_summary(metrics)
    assert set(summary) == {"urepa", "baseline"}
    assert summary["urepa"]["fid"] == 10.0 and summary["urepa"]["num_generated"] == 24
    assert summary["baseline"]["sampling"]["steps"] == 25 and summary["urepa"]["checkpoint_step"] == 120


def test_report_renders_every_section_self_contained(run_files, tmp_path):
    runs, curves, _ = run_files
    add_targets(curves, None)
    plot_fid_curves(curves, tmp_path / "curves.png")
    render_report("smoke", runs, curves, tmp_path / "curves.png", tmp_path / "report.html")
    page = (tmp_path / "report.html").read_text()
    for heading in ("Ablations", "FID vs training step", "Training losses", "Alignment with DINOv2", "Samples"):
        assert f"<h2>{heading}</h2>" in page
    assert "Stand-in feature network" in page
    # 1 FID curve + 2 runs x (loss curve, t-SNE, sample grid), all embedded: no file references
    assert len(re.findall(r'src="data:image/png;base64,', page)) == 7
    assert "src=\"/" not in page and "file://" not in page
    cells = [re.findall(r"<td>([^<]*)</td>", row) for row in re.findall(r"<tr>(.*?)</tr>", page, re.S)]
    cells = [row for row in cells if row]
    assert [row[:2] for row in cells[:2]] == [["urepa", "10"], ["baseline", "11"]]  # ablation, FID
    # FID-vs-step: the target is the baseline's final FID (11 + 100/80); urepa reaches it at step 80
    assert cells[2][:3] == ["urepa", "12.25", "80"] and cells[3][:3] == ["baseline", "12.25", "80"]
    # Alignment: every score beside its chance level; the baseline has no head, so no head scores.
    tables = re.findall(r"<table.*?</table>", page, re.S)
    assert re.findall(r"<th>([^<]*)</th>", tables[2]) == [
        "ablation", "layer", "timestep", "cknna", "cknna_chance", "cca", "cca_chance", "head_token_cosine",
        "head_token_cosine_chance", "head_cknna", "head_cknna_chance"]
    assert cells[4] == ["urepa", "mid", "500", "0.3", "0.01", "0.5", "-0.02", "0.6", "0.4", "0.7", "0.03"]
    assert cells[5] == ["baseline", "mid", "500", "0.2", "0.01", "0.5", "-0.02"] + ["–"] * 4
    assert "(4 + 4 images, PCA to 2 dimensions, mean of 2 canonical correlations)" in page
