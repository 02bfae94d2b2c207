"""Stage 6 (urepa.report): fid.json's summary over seeds and the self-contained report page."""
import json
import re
from pathlib import Path

import pandas as pd
import pytest

from conftest import REPO, make_runs, write_png
from urepa import config as urepa_config
from urepa.curves import add_targets, cfg_sweep
from urepa.plots import plot_cfg_sweeps, plot_fid_curves
from urepa.report import (by_label, convergence, cost_to_step, fid_summary, model_step_costs, objective_text,
                          render_report, step_costs)
from urepa.train import LOG_COLUMNS


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
    _, _, sweeps, metrics = make_runs(tmp_path, seeds=(0, 1, 2))
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


RECONSTRUCTION = {"images": 32, "skipped": [], "psnr": 11.23456, "ssim": 0.0712, "lpips": 0.6, "rfid": 301.5,
                  "feature_network": "stand-in (random conv net, seed 0; NOT Inception)",
                  "lpips_network": "lpips-vgg (stand-in: random VGG16 backbone, seed 0)", "image_size": 128}


def write_train_log(path, step_times):
    """A train_log.csv as the trainer writes it, with these step times (seconds)."""
    rows = [{**dict.fromkeys(LOG_COLUMNS, 0.1), "step": step, "step_time": t} for step, t in enumerate(step_times, 1)]
    pd.DataFrame(rows, columns=LOG_COLUMNS).to_csv(path, index=False)
    return path


CPU = {"device": "cpu", "processes": 1, "from_step": 0, "threads": 2, "grad_accum": 1}


def uniform_costs(folder, curves, step_time=0.5):
    """`step_costs` of each run in `curves`: its final curve step of steps at `step_time` seconds on one CPU."""
    return {a: {seed: step_costs(write_train_log(folder / f"{a}-{seed}.csv", [step_time] * c["points"][-1]["step"]),
                                 [CPU]) for seed, c in by_seed.items()} for a, by_seed in curves.items()}


def _render(runs, curves, sweeps, folder, run_vaes=None, reconstructions=None, probes=None, settings=None,
            target_fid=None, tier_source="smoke", pretrained=None, comparison_grid_png=None) -> str:
    """The report page as the rules make it: fid.json (the final set's summary, with `pretrained`'s {"metrics",
    "cfg_sweep"} of seed 0 where given, and the curves' convergence), then targets, both plots and the page (every
    run on SD-1.5's VAE unless `run_vaes` says otherwise)."""
    metrics = {a: {seed: json.loads(Path(p["metrics"]).read_text()) for seed, p in by_seed.items()}
               for a, by_seed in runs.items()}
    reference = {"pretrained": {0: pretrained["metrics"]}} if pretrained else {}
    fid = fid_summary({**reference, **metrics},
                      {**({"pretrained": {0: pretrained["cfg_sweep"]}} if pretrained else {}), **sweeps})
    for ablation, additions in convergence(curves, uniform_costs(folder, curves), None).items():
        fid[ablation].update(additions)
    add_targets(curves, target_fid)
    plot_fid_curves(by_label(curves), folder / "curves.png")
    plot_cfg_sweeps(by_label(sweeps), folder / "sweep.png")
    render_report("smoke", runs, curves, sweeps, folder / "curves.png", folder / "sweep.png", folder / "report.html",
                  run_vaes or dict.fromkeys(runs, "sd15"), reconstructions or {"sd15": RECONSTRUCTION}, fid, probes,
                  settings, target_fid, tier_source, pretrained_sweep=pretrained and pretrained["cfg_sweep"],
                  comparison_grid_png=comparison_grid_png)
    return (folder / "report.html").read_text()


def test_report_gives_mean_and_std_over_seeds_and_a_row_per_run(tmp_path):
    runs, curves, sweeps, _ = make_runs(tmp_path, seeds=(0, 1, 2))
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


def table_with(page: str, column: str) -> tuple[list[str], list[list[str]]]:
    """The header and body rows of the page's first table with this column."""
    table = next(t for t in re.findall(r"<table.*?</table>", page, re.S)
                 if column in re.findall(r"<th>([^<]*)</th>", t))
    rows = [re.findall(r"<td>([^<]*)</td>", row) for row in re.findall(r"<tr>(.*?)</tr>", table, re.S)]
    return re.findall(r"<th>([^<]*)</th>", table), [row for row in rows if row]


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
    # FID-vs-step: two points of 12 images per run
    assert cells[10] == ["urepa", "2", "12"] and cells[11] == ["baseline", "2", "12"]
    # Alignment: every score beside its chance level, under readable headers, in two narrow tables: the pooled
    # features of every run, then the heads' tokens, where the baseline (no head) has no row.
    header, rows = table_with(page, "CKNNA by chance")
    assert header == ["run", "layer", "timestep t", "CKNNA (0–1)", "CKNNA by chance", "CCA: mean canonical corr. (0–1)",
                      "CCA by chance"]
    assert rows == [["urepa", "mid", "500", "0.3", "0.01", "0.5", "-0.02"],
                    ["baseline", "mid", "500", "0.2", "0.01", "0.5", "-0.02"]]
    header, rows = table_with(page, "cosine by chance")
    assert header == ["run", "timestep t", "token cosine (−1–1)", "cosine by chance", "head CKNNA (0–1)",
                      "head CKNNA by chance"]
    assert rows == [["urepa", "500", "0.6", "0.4", "0.7", "0.03"]]
    assert "_chance" not in page and "head_token_cosine" not in page
    assert "(4 + 4 images, PCA to 2 dimensions, mean of 2 canonical correlations)" in page


def test_report_puts_each_vaes_reconstruction_beside_the_runs_on_it(run_files, tmp_path):
    runs, curves, sweeps, _ = run_files
    page = _render(runs, curves, sweeps, tmp_path)
    assert "<h2>VAE reconstruction</h2>" in page and "another latent space" not in page
    assert "random VGG16 backbone" in page  # a stand-in LPIPS is said to be one
    tables = re.findall(r"<table.*?</table>", page, re.S)
    header = re.findall(r"<th>([^<]*)</th>", tables[0])
    ablations = [re.findall(r"<td>([^<]*)</td>", row) for row in re.findall(r"<tr>(.*?)</tr>", tables[0], re.S)]
    ablations = [row for row in ablations if row]
    assert [row[header.index("VAE")] for row in ablations] == ["sd15", "sd15"]

    e2e = {**RECONSTRUCTION, "psnr": 9.5, "rfid": 350.0}
    page = _render(runs, curves, sweeps, tmp_path, {"urepa": "e2e", "baseline": "sd15"},
                   {"sd15": RECONSTRUCTION, "e2e": e2e})
    assert "another latent space" in page  # what a row on another VAE measures
    table = next(t for t in re.findall(r"<table.*?</table>", page, re.S) if "rFID" in t)
    header = re.findall(r"<th>([^<]*)</th>", table)
    rows = [re.findall(r"<td>([^<]*)</td>", row) for row in re.findall(r"<tr>(.*?)</tr>", table, re.S)]
    rows = [row for row in rows if row]
    assert [[row[header.index(k)] for k in ("VAE", "runs", "images", "PSNR (dB)", "rFID")] for row in rows] == [
        ["sd15", "baseline", "32", "11.23", "301.5"], ["e2e", "urepa", "32", "9.5", "350"]]


def curve(*points):
    """A fid_curve.json from (step, FID) pairs."""
    return {"points": [{"step": step, "fid": fid, "num_samples": 12} for step, fid in points]}


def test_step_costs_sum_each_launchs_processes_and_name_its_device(tmp_path):
    # Steps 1-2 on one CPU; the run then resumed from step 2 on 4 GPUs: device-seconds 1, 2, 0.5 x 4, 0.25 x 4.
    gpus = {"device": "cuda:0", "device_name": "NVIDIA H100", "processes": 4, "from_step": 2}
    costs = step_costs(write_train_log(tmp_path / "train_log.csv", [1.0, 2.0, 0.5, 0.25]), [CPU, gpus])
    assert costs["device_seconds"].tolist() == [1.0, 2.0, 2.0, 1.0]
    assert costs["device"].tolist() == ["cpu × 1"] * 2 + ["NVIDIA H100 × 4"] * 2
    assert cost_to_step(costs, 0) == 0.0 and cost_to_step(costs, 4) == 6.0
    assert cost_to_step(costs, 2.5) == 4.0  # 3 by step 2, then half of step 3's 2
    with pytest.raises(ValueError, match="past the 4 steps"):
        cost_to_step(costs, 5)
    # A relaunch that started from the same checkpoint as the one before redid its steps: they are its.
    costs = step_costs(tmp_path / "train_log.csv", [CPU, {**CPU, "processes": 2}])
    assert costs["device_seconds"].tolist() == [2.0, 4.0, 1.0, 0.5]
    pd.DataFrame({"step": [1, 3], "step_time": [1.0, 1.0]}).to_csv(tmp_path / "gap.csv", index=False)
    with pytest.raises(ValueError, match="gap.csv: the steps are not 1, 2, ..., 2"):
        step_costs(tmp_path / "gap.csv", [CPU])


def test_model_step_costs_read_the_launches_of_the_runs_run_json(tmp_path):
    model = tmp_path / "model"
    model.mkdir()
    write_train_log(model / "train_log.csv", [0.5, 0.5, 0.5])
    (model / "config.json").write_text(json.dumps({"final_step": 3, "launches": [{**CPU, "processes": 2}]}))
    assert model_step_costs(model)["device_seconds"].sum() == 3.0
    # A joint row: the U-Net of a tuning run, whose cost is the tuning run's (its state folder's run.json).
    state, tuned, joint = tmp_path / "state", tmp_path / "tuned", tmp_path / "joint"
    for folder in (state, tuned, joint):
        folder.mkdir()
    (state / "run.json").write_text(json.dumps({"seed": 0, "launches": [{**CPU, "processes": 3}]}))
    (tuned / "config.json").write_text(json.dumps({"final_step": 2, "run_state": str(state)}))
    (joint / "config.json").write_text(json.dumps({"final_step": 2, "joint": str(tuned)}))
    write_train_log(joint / "train_log.csv", [1.0, 1.0])
    costs = model_step_costs(joint)
    assert costs["device_seconds"].sum() == 6.0 and set(costs["device"]) == {"cpu × 3"}


def test_convergence_interpolates_steps_and_cost_to_the_baselines_final_fid(tmp_path):
    curves = {"baseline": {0: curve((0, 50.0), (40, 30.0), (80, 20.0))},
              "urepa": {0: curve((0, 50.0), (40, 24.0), (80, 16.0))},
              "never": {0: curve((0, 50.0), (40, 35.0), (80, 25.0))},
              "early": {0: curve((40, 18.0), (80, 15.0))}}  # no step-0 point; already below at its first
    costs = uniform_costs(tmp_path, curves)  # 0.5 device-seconds a step
    costs["urepa"][0] = step_costs(write_train_log(tmp_path / "urepa.csv", [0.75] * 80), [{**CPU, "processes": 2}])
    result = convergence(curves, costs, None)
    base, urepa, never, early = (result[a]["convergence"] for a in ("baseline", "urepa", "never", "early"))
    assert urepa["target_fid"] == 20.0 and urepa["steps"] == [0, 40, 80]
    # the baseline reaches its own final FID at its final point; urepa between 40 (24) and 80 (16): 40 + 4 / 8 x 40
    assert base["runs"]["seed-0"]["steps_to_target"] == {"step": 80.0, "how": "at_point"}
    run = urepa["runs"]["seed-0"]
    assert run["steps_to_target"] == {"step": 60.0, "how": "interpolated"}
    assert run["vs_baseline"]["speedup"] == {"ratio": pytest.approx(80 / 60), "bound": "exact"}
    # urepa costs 0.75 s x 2 processes a step: 90 device-seconds to step 60, against the baseline's 80 x 0.5 = 40
    assert run["device_seconds_to_target"] == pytest.approx(90.0)
    assert base["runs"]["seed-0"]["device_seconds_to_target"] == pytest.approx(40.0)
    assert run["vs_baseline"]["compute_speedup"] == {"ratio": pytest.approx(40 / 90), "bound": "exact"}
    assert result["urepa"]["training_cost"]["device_seconds"]["mean"] == pytest.approx(120.0)
    assert result["urepa"]["training_cost"]["device"] == "cpu × 2"
    assert urepa["speedup"] == {"mean": pytest.approx(80 / 60), "std": None, "n": 1, "seeds": [0], "bound": "exact"}
    # FID at matched steps and its difference to the baseline at each
    assert urepa["fid_at_step"]["40"] == {"mean": 24.0, "std": None, "n": 1}
    assert {s: d["mean"] for s, d in urepa["fid_vs_baseline_at_step"].items()} == {"0": 0.0, "40": -6.0, "80": -4.0}
    assert "fid_vs_baseline_at_step" not in base and "speedup" not in base
    # never reached: no step, no ratio
    assert never["runs"]["seed-0"]["steps_to_target"] == {"step": None, "how": "not_reached"}
    assert never["runs"]["seed-0"]["vs_baseline"]["speedup"] == {"ratio": None, "bound": "not reached"}
    assert never["speedup"] is None and never["steps_to_target"] is None
    # already below at its first point (step 40): reached at step 40 or sooner, so at least 80 / 40 = 2x
    assert early["runs"]["seed-0"]["steps_to_target"] == {"step": 40.0, "how": "first_point"}
    assert early["speedup"]["mean"] == 2.0 and early["speedup"]["bound"] == "at least"
    # the baseline also below the target at its first point: neither says when, so no ratio
    late_baseline = {"baseline": {0: curve((40, 10.0), (80, 20.0))}, "early": curves["early"]}
    early = convergence(late_baseline, costs, None)["early"]["convergence"]
    assert early["runs"]["seed-0"]["vs_baseline"]["speedup"] == {"ratio": None, "bound": "undetermined"}
    assert early["speedup"] is None
    assert "0" not in early["fid_at_step"] and "0" not in early["fid_vs_baseline_at_step"]
    # a configured target replaces the baseline's final FID; the pretrained point reaching it gives no ratio
    result = convergence(curves, costs, 55.0)["urepa"]["convergence"]
    assert result["target_fid"] == 55.0 and result["runs"]["seed-0"]["steps_to_target"] == {"step": 0.0,
                                                                                           "how": "at_point"}
    assert result["runs"]["seed-0"]["vs_baseline"]["speedup"] == {"ratio": None, "bound": "pretrained at target"}


def test_convergence_over_seeds_gives_mean_std_and_pairs_by_seed(tmp_path):
    curves = {"baseline": {0: curve((40, 30.0), (80, 20.0)), 1: curve((40, 34.0), (80, 24.0))},
              "urepa": {0: curve((40, 24.0), (80, 16.0)), 1: curve((40, 26.0), (80, 20.0))}}
    costs = uniform_costs(tmp_path, curves, step_time=1.0)
    costs["urepa"] = uniform_costs(tmp_path, {"urepa": curves["urepa"]}, step_time=2.0)["urepa"]
    urepa = convergence(curves, costs, None)["urepa"]["convergence"]
    # FID per step over seeds: 40: 24, 26; 80: 16, 20. Paired differences: 40: -6, -8; 80: -4, -4.
    assert urepa["fid_at_step"]["40"] == pytest.approx({"mean": 25.0, "std": 2 ** 0.5, "n": 2})
    assert urepa["fid_at_step"]["80"] == pytest.approx({"mean": 18.0, "std": 8 ** 0.5, "n": 2})
    deltas = urepa["fid_vs_baseline_at_step"]
    assert deltas["40"].pop("seeds") == [0, 1]
    assert deltas["40"] == pytest.approx({"mean": -7.0, "std": 2 ** 0.5, "n": 2})
    assert deltas["80"].pop("seeds") == [0, 1] and deltas["80"] == pytest.approx({"mean": -4.0, "std": 0.0, "n": 2})
    # The tier's target is the baseline seeds' mean final FID, 22: urepa seed 0 at 40 + 2/8 x 40 = 50,
    # seed 1 at 40 + 4/6 x 40.
    assert urepa["target_fid"] == 22.0
    assert urepa["steps_to_target"] == pytest.approx({"mean": (50 + 40 + 80 / 3) / 2, "std": (80 / 3 - 10) / 2 ** 0.5,
                                                      "n": 2})
    # Each pair's target is its baseline's final FID: seed 0 to 20 (urepa at 60, baseline at 80), seed 1 to 24
    # (urepa at 40 + 2/6 x 40, baseline at 80): speed-ups 4/3 and 1.5.
    pairs = {seed: run["vs_baseline"] for seed, run in urepa["runs"].items()}
    assert pairs["seed-1"]["target_fid"] == 24.0
    assert pairs["seed-1"]["steps_to_target"]["step"] == pytest.approx(40 + 40 / 3)
    ratios = [4 / 3, 1.5]
    assert [pairs[s]["speedup"]["ratio"] for s in ("seed-0", "seed-1")] == pytest.approx(ratios)
    mean = sum(ratios) / 2
    assert urepa["speedup"].pop("seeds") == [0, 1] and urepa["speedup"].pop("bound") == "exact"
    assert urepa["speedup"] == pytest.approx({"mean": mean, "std": (1.5 - 4 / 3) / 2 ** 0.5, "n": 2})
    # at 2 device-seconds a step against the baseline's 1, in compute terms each pair's ratio halves
    assert urepa["compute_speedup"]["mean"] == pytest.approx(mean / 2)
    assert urepa["compute_speedup"]["std"] == pytest.approx((1.5 - 4 / 3) / 2 / 2 ** 0.5)


def test_report_shows_the_speed_up_and_the_training_cost(run_files, tmp_path):
    runs, curves, sweeps, _ = run_files
    page = _render(runs, curves, sweeps, tmp_path)
    assert "<h2>Speed-up to the target</h2>" in page and "Read the speed-up as" in page
    # Curves: urepa 12.5 at 40, 11.25 at 80; the baseline 13.5, 12.25. Target 12.25: urepa at 40 + 0.25/1.25 x 40.
    # Every run 0.5 s a step on one CPU: 48 steps are 24 device-seconds, 80 are 40.
    header, rows = table_with(page, "speed-up (steps)")
    cell = {row[0]: dict(zip(header, row)) for row in rows}
    assert cell["urepa"]["target FID"] == "12.25" and cell["urepa"]["step at target"] == "48"
    assert cell["baseline"]["step at target"] == "80 (a point)" and cell["baseline"]["speed-up (steps)"] == "–"
    assert cell["urepa"]["speed-up (steps)"] == "1.667×" and cell["urepa"]["speed-up (device-s)"] == "1.667×"
    assert cell["urepa"]["device-h to target"] == f"{24 / 3600:.4g}"
    header, rows = table_with(page, "training cost (device-h)")
    assert [row[header.index("training cost (device-h)")] for row in rows] == [f"{40 / 3600:.4g} (cpu × 1)"] * 2
    header, rows = table_with(page, "80")
    assert header == ["ablation", "40", "80"] and rows == [["urepa", "12.5", "11.25"], ["baseline", "13.5", "12.25"]]
    assert "<h3>Seed pairs</h3>" not in page
    # where no pair has a ratio, the table says why
    curves["urepa"][0]["points"][0]["fid"] = 12.0  # urepa now below the target at its first point, as the baseline
    curves["baseline"][0]["points"][0]["fid"] = 12.0
    header, rows = table_with(_render(runs, curves, sweeps, tmp_path), "speed-up (steps)")
    assert rows[0][header.index("speed-up (steps)")] == "undetermined"


def test_report_gives_the_speed_up_per_seed_pair(tmp_path):
    runs, curves, sweeps, _ = make_runs(tmp_path, seeds=(0, 1, 2))
    page = _render(runs, curves, sweeps, tmp_path)
    # Seed s: urepa 12.5 + s/2 at step 40, the baseline's final FID 12.25 + 1.5 s. Seed 0 reaches it at step 48
    # (80 / 48 = 1.667x), seeds 1 and 2 are below it at their first point (at least 80 / 40 = 2x).
    header, rows = table_with(page, "baseline step")
    assert [row[0] for row in rows] == ["urepa · seed 0", "urepa · seed 1", "urepa · seed 2"]
    assert [row[header.index("step")] for row in rows] == ["48", "≤ 40 (first point)", "≤ 40 (first point)"]
    assert [row[header.index("speed-up (steps)")] for row in rows] == ["1.667×", "≥ 2×", "≥ 2×"]
    header, rows = table_with(page, "speed-up (steps)")
    assert rows[0][header.index("speed-up (steps)")] == "1.889 ± 0.19× (bounds mixed)"
    # FID at step 40 over seeds: 12.5, 13, 13.5; paired with the baseline's 13.5, 15, 16.5: -1, -2, -3
    header, rows = table_with(page, "40")
    assert rows[0] == ["urepa", "13 ± 0.5", "11.75 ± 0.5"]
    delta = page.split("ΔFID vs baseline at matched steps")[1]
    assert re.findall(r"<td>([^<]*)</td>", delta)[:3] == ["urepa", "-2 ± 1", "-2 ± 1"]


def test_report_gives_the_linear_probe_between_chance_and_dinov2(run_files, tmp_path):
    runs, curves, sweeps, _ = run_files

    def result(top1, layer="mid", timestep=250):
        return {"layer": layer, "timestep": timestep, "top1": top1, "train_top1": 1.0, "train_images": 64,
                "val_images": 32, "converged": True, "classes": 4, "chance": 0.25, "C": 1.0}

    probes = {"urepa": result(0.5), "baseline": result(0.375), "pretrained": result(0.3125),
              "DINOv2 (ceiling)": result(0.875, "pooled patch tokens", None)}
    page = _render(runs, curves, sweeps, tmp_path, probes=probes)
    assert "<h2>Linear probe</h2>" in page and "C = 1)" in page
    table = next(t for t in re.findall(r"<table.*?</table>", page, re.S) if "train top-1" in t)
    rows = [re.findall(r"<td>([^<]*)</td>", row) for row in re.findall(r"<tr>(.*?)</tr>", table, re.S)]
    assert [row[:3] for row in rows if row] == [
        ["urepa", "mid, t = 250", "0.5"], ["baseline", "mid, t = 250", "0.375"],
        ["pretrained", "mid, t = 250", "0.3125"],
        ["DINOv2 (ceiling)", "pooled patch tokens", "0.875"], ["chance", "1 / 4 classes", "0.25"]]


def test_each_rows_objective_is_named_from_its_settings(run_files, tmp_path):
    """The objective column, from each run's settings (not its name): λ and the terms, projector, target
    normalisation, cutoff as a share of the run, layers and fine-tune mode."""
    config = urepa_config.load_yaml(REPO / "config" / "config.yaml")
    text = {a: objective_text(urepa_config.train_settings(config, "smoke", a))
            for a in ("urepa", "baseline", "irepa", "haste", "token_manifold", "token_only", "multi_layer", "partial")}
    assert text == {
        "urepa": "λ=0.8 · (token + 3 × manifold (sample Gram)), MLP projector, LoRA",
        "baseline": "diffusion loss only (no alignment), LoRA",
        "irepa": "λ=0.8 · (token + 3 × manifold (sample Gram)), 3x3 conv projector, spatially normalised targets "
                 "(α=0.6), LoRA",
        "haste": "λ=0.8 · (token + 3 × manifold (sample Gram)), MLP projector, alignment off after 50% "
                 "(from step 60 of 120), LoRA",
        "token_manifold": "λ=0.8 · (token + 3 × manifold (token Gram)), MLP projector, LoRA",
        "token_only": "λ=0.8 · (token), MLP projector, LoRA",
        "multi_layer": "λ=0.8 · (token + 3 × manifold (sample Gram)), MLP projector, layers enc_last + mid + "
                       "dec_first, LoRA",
        "partial": "λ=0.8 · (token + 3 × manifold (sample Gram)), MLP projector, partial blocks"}
    decaying = urepa_config.train_settings(config, "smoke", "urepa")
    decaying["align_schedule"].update(kind="cosine", warmup_steps=10, decay_steps=50, end=0.1)
    assert "λ warm-up 10 steps, λ cosine decay to 0.1 over 50 steps" in objective_text(decaying)

    runs, curves, sweeps, _ = run_files
    settings = {a: urepa_config.train_settings(config, "smoke", a) for a in runs}
    table = re.findall(r"<table.*?</table>", _render(runs, curves, sweeps, tmp_path, settings=settings), re.S)[0]
    header = re.findall(r"<th>([^<]*)</th>", table)
    rows = [re.findall(r"<td>([^<]*)</td>", row) for row in re.findall(r"<tr>(.*?)</tr>", table, re.S)]
    assert [row[header.index("objective")] for row in rows if row] == [text["urepa"], text["baseline"]]


def test_report_reads_every_run_against_the_pretrained_row_and_shows_the_comparison_grid(run_files, tmp_path):
    """SD-1.5 as it is (fid.json's `pretrained`): the Ablations table's first row, its difference to the baseline,
    no training cost; its CFG sweep beside the runs'; the same-noise grid with its caption."""
    runs, curves, sweeps, metrics = run_files
    reference = {**metrics["baseline"][0], "fid": 15.0, "checkpoint_step": 0, "weights": "pretrained"}
    sweep_files = []
    for scale, fid in ((1.5, 17.0), (7.5, 16.0)):
        (tmp_path / f"pretrained-cfg-{scale:g}.json").write_text(json.dumps(
            {**reference, "fid": fid, "sampling": {**reference["sampling"], "cfg_scale": scale}}))
        sweep_files.append(tmp_path / f"pretrained-cfg-{scale:g}.json")
    pretrained = {"metrics": reference, "cfg_sweep": cfg_sweep(sweep_files)}
    page = _render(runs, curves, sweeps, tmp_path, pretrained=pretrained,
                   comparison_grid_png=write_png(tmp_path / "comparison.png", "white"))
    header, rows = table_with(page, "ΔFID vs baseline")
    first = dict(zip(header, rows[0]))
    assert [row[0] for row in rows] == ["pretrained", "urepa", "baseline"]
    assert (first["seeds"], first["FID"], first["ΔFID vs baseline"], first["step"]) == ("1", "15", "4", "0")
    assert (first["best-CFG FID"], first["at CFG"], first["training cost (device-h)"]) == ("16", "7.5", "–")
    assert "The <i>pretrained</i> row is SD-1.5 as it is" in page
    header, rows = table_with(page, "CFG scale")
    assert [row[:3] for row in rows[:2]] == [["pretrained", "1.5", "17"], ["pretrained", "7.5", "16"]]
    assert rows[1][-1] == "✓" and [row[0] for row in rows[2:]] == ["urepa"] * 4 + ["baseline"] * 4
    grid = page.split("<h2>Same-noise comparison</h2>")[1].split("<h2>")[0]
    assert grid.count('src="data:image/png;base64,') == 1 and "same initial noise and prompt" in grid
    assert "<h2>Speed-up to the target</h2>" in page  # fid.json's pretrained entry has no curve of its own


def test_every_figure_and_table_of_the_report_has_a_sentence_saying_what_it_shows(run_files, tmp_path):
    """Each section with a figure or a table holds a paragraph that says what it shows; a run's own figures sit under
    the run's name, captioned once by the section above them."""
    runs, curves, sweeps, _ = run_files
    body = _render(runs, curves, sweeps, tmp_path).split("<body>")[1]
    for section in re.split(r"<h[23]>", body)[1:]:
        heading = section.split("</h")[0]
        if ("<img" in section or "<table" in section) and heading not in by_label(runs):
            assert "<p" in section, heading


def test_the_report_says_where_the_target_comes_from_and_why_the_two_fids_differ(run_files, tmp_path):
    runs, curves, sweeps, _ = run_files
    page = _render(runs, curves, sweeps, tmp_path)
    assert "the dashed line is the target every run is timed to: the baseline's final FID-vs-step FID" in page
    # the fixture's final sets hold 24 images, its curve points 12, both with the same sampler
    assert "table's final sample set has 24 images, each curve point 12, with the same sampler (dpmpp 25 steps)" in page
    sweeps["urepa"][0]["points"][0]["sampling"]["steps"] = 10
    page = _render(runs, curves, sweeps, tmp_path)
    assert "each curve point 12, with dpmpp 25 steps against the curve's dpmpp 10 steps" in page
    page = _render(runs, curves, sweeps, tmp_path, target_fid=12.0)
    assert "timed to: <code>evaluate.target_fid</code> = 12, set in the config" in page


def test_sample_grids_of_a_generated_tier_are_captioned_as_such(run_files, tmp_path):
    runs, curves, sweeps, _ = run_files
    samples = _render(runs, curves, sweeps, tmp_path, tier_source="smoke").split("<h2>Samples</h2>")[1]
    assert "one row per class" in samples
    assert "Tier smoke runs on models generated here (source: smoke)" in samples
    samples = _render(runs, curves, sweeps, tmp_path, tier_source="imagenet").split("<h2>Samples</h2>")[1]
    assert "one row per class" in samples and "generated here" not in samples


def test_the_ablations_table_says_a_shared_sampler_once_above_it(run_files, tmp_path):
    runs, curves, sweeps, _ = run_files
    page = _render(runs, curves, sweeps, tmp_path)
    header, _ = table_with(page, "ΔFID vs baseline")
    assert not {"samples", "step", "sampler"} & set(header) and "VAE" in header
    assert ("<p>Every row: samples: 24 · step: 120 · sampler: dpmpp 25 steps, CFG 7.5 in t/T∈[0.0, 0.7].</p>"
            in page.split("<h2>Ablations</h2>")[1].split("<table")[0])
    metrics = json.loads(Path(runs["baseline"][0]["metrics"]).read_text())
    Path(runs["baseline"][0]["metrics"]).write_text(json.dumps({**metrics, "num_generated": 48}))
    page = _render(runs, curves, sweeps, tmp_path)
    header, rows = table_with(page, "ΔFID vs baseline")
    assert [row[header.index("samples")] for row in rows] == ["24", "48"] and "sampler" not in header
