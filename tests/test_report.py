"""Stages 5-6 glue: FID-vs-step targets, the held-out batch, fid.json and the report page."""
import json
import re

import pandas as pd
import pytest
from PIL import Image

from urepa.evaluate import add_targets, cfg_sweep, fid_curve, held_out_rows, steps_to_target
from urepa.report import by_label, fid_summary, plot_cfg_sweeps, plot_fid_curves, render_report

STAND_IN = "stand-in (random conv net, seed 0; NOT Inception)"


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
    return _runs(tmp_path, seeds=(0,))


def _runs(tmp_path, seeds):
    """Run outputs of urepa and baseline at each seed: FID 10 + i (1 + seed) + seed / 2 (i = 0 urepa, 1 baseline)."""
    runs, curves, sweeps, metrics = {}, {}, {}, {}
    for i, ablation in enumerate(["urepa", "baseline"]):
        for seed in seeds:
            d = tmp_path / ablation / f"seed-{seed}"
            d.mkdir(parents=True)
            m = {"fid": 10.0 + i * (1 + seed) + seed / 2, "sfid": 20.0, "kid_mean": 0.01, "kid_std": 0.001, "inception_score_mean": 3.0,
                 "inception_score_std": 0.1, "precision": 0.5, "recall": 0.4, "num_generated": 24, "num_reference": 32,
                 "feature_network": STAND_IN, "checkpoint_step": 120, "weights": "EMA",
                 "sampling": {"sampler": "dpmpp", "steps": 25, "cfg_scale": 7.5, "guidance_low": 0.0, "guidance_high": 0.7}}
            (d / "metrics.json").write_text(json.dumps(m))
            metrics.setdefault(ablation, {})[seed] = m
            points = []
            for step in (40, 80):
                point = {**m, "fid": m["fid"] + 100 / step, "checkpoint_step": step, "num_generated": 12}
                (d / f"point-{step}.json").write_text(json.dumps(point))
                points.append(d / f"point-{step}.json")
            curves.setdefault(ablation, {})[seed] = fid_curve(points)
            # CFG sweep written in the order Snakemake lists the scales; FID lowest at 3.0 for urepa, 2.0 for baseline.
            sweep_files = []
            for scale, fid in ((7.5, 30.0), (1.5, 14.0), (3.0, 9.0 + 2 * i), (2.0, 10.0)):
                point = {**m, "fid": fid, "precision": 0.1 * scale, "num_generated": 12,
                         "sampling": {**m["sampling"], "cfg_scale": scale}}
                (d / f"cfg-{scale:g}.json").write_text(json.dumps(point))
                sweep_files.append(d / f"cfg-{scale:g}.json")
            sweeps.setdefault(ablation, {})[seed] = cfg_sweep(sweep_files)
            entry = {"timestep": 500, "cknna": 0.3 - i / 10, "cknna_chance": 0.01, "cca": 0.5, "cca_components": 2,
                     "cca_pca_dims": 2, "cca_fit_images": 4, "cca_scored_images": 4, "cca_chance": -0.02}
            if ablation == "urepa":
                entry.update(head_token_cosine=0.6, head_token_cosine_chance=0.4, head_cknna=0.7, head_cknna_chance=0.03)
            (d / "alignment.json").write_text(json.dumps({"layer": "mid", "images": 8, "has_head": ablation == "urepa",
                                                          "timesteps": [entry]}))
            runs.setdefault(ablation, {})[seed] = {
                "metrics": str(d / "metrics.json"), "alignment": str(d / "alignment.json"),
                "loss_curve": _png(d / "loss.png", "red"), "tsne": _png(d / "tsne.png", "green"),
                "grid": _png(d / "grid.png", "blue")}
    return runs, curves, sweeps, metrics


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


def test_fid_summary_keeps_the_headline_numbers(run_files):
    _, _, sweeps, metrics = run_files
    summary = fid_summary(metrics, sweeps)
    assert set(summary) == {"urepa", "baseline"}
    urepa = summary["urepa"]["runs"]["seed-0"]
    assert urepa["cfg_sweep_best"]["fid"] == 9.0 and urepa["cfg_sweep_best"]["cfg_scale"] == 3.0
    assert urepa["fid"] == 10.0 and urepa["num_generated"] == 24 and urepa["checkpoint_step"] == 120
    assert summary["baseline"]["runs"]["seed-0"]["sampling"]["steps"] == 25
    # one seed: the mean is the value, no standard deviation
    assert summary["urepa"]["fid"] == {"mean": 10.0, "std": None, "n": 1} and summary["urepa"]["seeds"] == [0]
    assert summary["urepa"]["fid_vs_baseline"] == {"mean": -1.0, "std": None, "n": 1, "seeds": [0]}
    assert "fid_vs_baseline" not in summary["baseline"]


def test_fid_summary_gives_mean_and_std_over_seeds_and_the_paired_difference(tmp_path):
    _, _, sweeps, metrics = _runs(tmp_path, seeds=(0, 1, 2))
    summary = fid_summary(metrics, sweeps)
    # urepa FIDs 10, 10.5, 11; baseline 11, 12.5, 14; paired differences -1, -2, -3
    assert summary["urepa"]["fid"] == pytest.approx({"mean": 10.5, "std": 0.5, "n": 3})
    assert summary["baseline"]["fid"] == pytest.approx({"mean": 12.5, "std": 1.5, "n": 3})
    assert summary["urepa"]["fid_vs_baseline"]["mean"] == pytest.approx(-2.0)
    assert summary["urepa"]["fid_vs_baseline"]["std"] == pytest.approx(1.0)
    assert summary["urepa"]["sfid"]["std"] == 0.0 and sorted(summary["urepa"]["runs"]) == ["seed-0", "seed-1", "seed-2"]
    # only seeds present in both runs are paired
    del metrics["baseline"][2]
    assert fid_summary(metrics, sweeps)["urepa"]["fid_vs_baseline"]["seeds"] == [0, 1]


def _render(runs, curves, sweeps, folder) -> str:
    """The report page as the report rule makes it: targets, both plots, then the page."""
    add_targets(curves, None)
    plot_fid_curves(by_label(curves), folder / "curves.png")
    plot_cfg_sweeps(by_label(sweeps), folder / "sweep.png")
    render_report("smoke", runs, curves, sweeps, folder / "curves.png", folder / "sweep.png", folder / "report.html")
    return (folder / "report.html").read_text()


def test_report_gives_mean_and_std_over_seeds_and_a_row_per_run(tmp_path):
    runs, curves, sweeps, _ = _runs(tmp_path, seeds=(0, 1, 2))
    page = _render(runs, curves, sweeps, tmp_path)
    tables = re.findall(r"<table.*?</table>", page, re.S)
    header = re.findall(r"<th>([^<]*)</th>", tables[0])
    rows = [re.findall(r"<td>([^<]*)</td>", row) for row in re.findall(r"<tr>(.*?)</tr>", tables[0], re.S)]
    assert [row[:3] for row in rows] == [["urepa", "3", "10.5 ± 0.5"], ["baseline", "3", "12.5 ± 1.5"]]
    assert rows[0][header.index("ΔFID vs baseline")] == "-2 ± 1"
    runs_table = [re.findall(r"<td>([^<]*)</td>", row) for row in re.findall(r"<tr>(.*?)</tr>", tables[1], re.S)]
    assert [row[:2] for row in runs_table] == [["urepa · seed 0", "10"], ["urepa · seed 1", "10.5"],
                                               ["urepa · seed 2", "11"], ["baseline · seed 0", "11"],
                                               ["baseline · seed 1", "12.5"], ["baseline · seed 2", "14"]]
    # every run's loss curve, t-SNE and sample grid, plus the two plots
    assert len(re.findall(r'src="data:image/png;base64,', page)) == 2 + 6 * 3


def test_report_renders_every_section_self_contained(run_files, tmp_path):
    runs, curves, sweeps, _ = run_files
    page = _render(runs, curves, sweeps, tmp_path)
    for heading in ("Ablations", "Guidance scale", "FID vs training step", "Training losses", "Alignment with DINOv2",
                    "Samples"):
        assert f"<h2>{heading}</h2>" in page
    assert "Stand-in feature network" in page
    # FID curve + CFG sweep + 2 runs x (loss curve, t-SNE, sample grid), all embedded: no file references
    assert len(re.findall(r'src="data:image/png;base64,', page)) == 8
    assert "src=\"/" not in page and "file://" not in page
    cells = [re.findall(r"<td>([^<]*)</td>", row) for row in re.findall(r"<tr>(.*?)</tr>", page, re.S)]
    cells = [row for row in cells if row]
    assert [row[:3] for row in cells[:2]] == [["urepa", "1", "10"], ["baseline", "1", "11"]]  # ablation, seeds, FID
    header = re.findall(r"<th>([^<]*)</th>", page.split("</thead>")[0])
    assert cells[0][header.index("ΔFID vs baseline")] == "-1" and cells[1][header.index("ΔFID vs baseline")] == "–"
    assert cells[0][header.index("best-CFG FID")] == "9" and cells[0][header.index("at CFG")] == "3"
    # the sweep table: 2 runs x 4 scales, in scale order, best marked
    sweep_rows = cells[2:10]
    assert [row[:2] for row in sweep_rows[:4]] == [["urepa", "1.5"], ["urepa", "2"], ["urepa", "3"], ["urepa", "7.5"]]
    assert [row[-1] for row in sweep_rows[:4]] == ["", "", "✓", ""]
    # FID-vs-step: the target is the baseline's final FID (11 + 100/80); urepa reaches it at step 80
    assert cells[10][:3] == ["urepa", "12.25", "80"] and cells[11][:3] == ["baseline", "12.25", "80"]
    # Alignment: every score beside its chance level; the baseline has no head, so no head scores.
    tables = re.findall(r"<table.*?</table>", page, re.S)
    assert re.findall(r"<th>([^<]*)</th>", tables[3]) == [
        "run", "layer", "timestep", "cknna", "cknna_chance", "cca", "cca_chance", "head_token_cosine",
        "head_token_cosine_chance", "head_cknna", "head_cknna_chance"]
    assert cells[12] == ["urepa", "mid", "500", "0.3", "0.01", "0.5", "-0.02", "0.6", "0.4", "0.7", "0.03"]
    assert cells[13] == ["baseline", "mid", "500", "0.2", "0.01", "0.5", "-0.02"] + ["–"] * 4
    assert "(4 + 4 images, PCA to 2 dimensions, mean of 2 canonical correlations)" in page


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
