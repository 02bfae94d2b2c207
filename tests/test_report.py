"""Stage 6 (urepa.report): fid.json's summary over seeds and the self-contained report page."""
import re

import pytest

from conftest import REPO, make_runs
from urepa import config as urepa_config
from urepa.evaluate import add_targets
from urepa.plots import plot_cfg_sweeps, plot_fid_curves
from urepa.report import by_label, fid_summary, objective_text, render_report


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


def _render(runs, curves, sweeps, folder, run_vaes=None, reconstructions=None) -> str:
    """The report page as the report rule makes it: targets, both plots, then the page (every run on SD-1.5's VAE
    unless `run_vaes` says otherwise)."""
    add_targets(curves, None)
    plot_fid_curves(by_label(curves), folder / "curves.png")
    plot_cfg_sweeps(by_label(sweeps), folder / "sweep.png")
    render_report("smoke", runs, curves, sweeps, folder / "curves.png", folder / "sweep.png", folder / "report.html",
                  run_vaes or dict.fromkeys(runs, "sd15"), reconstructions or {"sd15": RECONSTRUCTION})
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
    add_targets(curves, None)
    plot_fid_curves(by_label(curves), tmp_path / "curves.png")
    plot_cfg_sweeps(by_label(sweeps), tmp_path / "sweep.png")
    settings = {a: urepa_config.train_settings(config, "smoke", a) for a in runs}
    render_report("smoke", runs, curves, sweeps, tmp_path / "curves.png", tmp_path / "sweep.png",
                  tmp_path / "report.html", dict.fromkeys(runs, "sd15"), {"sd15": RECONSTRUCTION}, settings)
    table = re.findall(r"<table.*?</table>", (tmp_path / "report.html").read_text(), re.S)[0]
    header = re.findall(r"<th>([^<]*)</th>", table)
    rows = [re.findall(r"<td>([^<]*)</td>", row) for row in re.findall(r"<tr>(.*?)</tr>", table, re.S)]
    assert [row[header.index("objective")] for row in rows if row] == [text["urepa"], text["baseline"]]
