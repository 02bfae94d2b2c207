"""benchmarks/suite.py at smoke scale on the CPU: every section present with its figures (or an explicit error
record), what no longer fits the time budget listed as skipped, one failing section recorded while the others run,
and the JSON written after every section."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO

SUITE = REPO / "benchmarks" / "suite.py"
SECTIONS = ["train", "speed", "largest_batch", "caches", "sampling", "features", "vae_tune"]


def run_suite(out: Path, *args: str) -> str:
    """The suite's printed output; its JSON is at `out`."""
    done = subprocess.run([sys.executable, str(SUITE), "--scale", "smoke", "--device", "cpu", "--out", str(out),
                           *args], capture_output=True, text=True, cwd=REPO)
    assert done.returncode == 0, done.stderr[-4000:]
    return done.stdout


@pytest.fixture(scope="module")
def smoke_suite(tmp_path_factory) -> tuple[dict, str]:
    out = tmp_path_factory.mktemp("suite") / "suite.json"
    printed = run_suite(out, "--minutes", "60")  # budgets far above the CPU's needs: nothing skipped
    return json.loads(out.read_text()), printed


def records(report: dict, section: str) -> list[dict]:
    return report["sections"][section]["records"]


@pytest.mark.slow  # the whole suite on the tiny models: a few minutes on two cores
def test_every_section_runs_at_smoke_scale_and_reports_its_figures(smoke_suite):
    report, printed = smoke_suite
    assert list(report["sections"]) == SECTIONS
    for name, section in report["sections"].items():
        assert section["error"] is None and section["skipped"] == [], name
        assert all("error" not in r for r in section["records"]), (name, section["records"])

    train = records(report, "train")
    assert {(r["finetune"], r["ablation"], r["batch"]) for r in train} == {
        (f, a, b) for f in ("lora", "partial") for a in ("baseline", "urepa") for b in (4, 8)}
    step_ms = {(r["finetune"], r["ablation"], r["batch"]): r["step ms"] for r in train}
    for r in train:
        assert r["it/s"] > 0 and r["TFLOP/step"] > 0
        assert r["images/s"] == pytest.approx(r["batch"] * r["it/s"])
        assert r["it/s"] == pytest.approx(1000 / r["step ms"])
        base = step_ms[r["finetune"], "baseline", r["batch"]]
        assert r["overhead vs baseline %"] == pytest.approx(100 * (r["step ms"] / base - 1))
        assert "MFU %" not in r and "peak GiB" not in r  # CUDA figures only
    # U-REPA's step computes the baseline's plus the align head: more FLOPs at the same batch.
    flops = {(r["finetune"], r["ablation"], r["batch"]): r["TFLOP/step"] for r in train}
    for finetune in ("lora", "partial"):
        assert flops[finetune, "urepa", 4] > flops[finetune, "baseline", 4]
        assert flops[finetune, "urepa", 8] == pytest.approx(2 * flops[finetune, "urepa", 4], rel=0.05)

    speed = {r["what"]: r for r in records(report, "speed")}
    assert set(speed) == {"lora urepa batch 4, speed options as configured", "lora urepa batch 4, tf32 off",
                          "lora urepa batch 4, fused_adamw off", "lora urepa batch 4, compile on",
                          "lora urepa batch 4, channels_last on", "lora urepa batch 4, pin_memory off"}
    assert speed["lora urepa batch 4, compile on"]["note"] == "not timed: --skip-options"
    assert all(r["it/s"] > 0 for what, r in speed.items() if "compile" not in what)

    # No out-of-memory on the CPU: the doubling stops at the smoke scale's cap.
    largest = records(report, "largest_batch")
    assert [r["batch"] for r in largest[:-1]] == [8, 16]
    assert largest[-1]["batch"] == 16 and largest[-1]["first that does not"] is None

    caches = {r["cache"]: r for r in records(report, "caches")}
    assert set(caches) == {"VAE latents", "DINOv2 tokens", "CLIP embeddings"}
    assert caches["VAE latents"]["items"] == caches["DINOv2 tokens"]["items"] == 64
    assert caches["CLIP embeddings"]["items"] == 17  # 16 class prompts and the empty one
    assert caches["VAE latents"]["batch"] == caches["DINOv2 tokens"]["batch"] == 32  # config cache.batch_size
    assert caches["CLIP embeddings"]["batch"] == 64  # build_clip_cache's own, as the rule calls it
    assert all(r["items/s"] > 0 for r in caches.values())

    sampling = {r["preset"]: r for r in records(report, "sampling")}
    # The presets' steps inside the guidance interval t/T <= 0.7, by hand: DDIM's 250 "leading" steps are
    # t = 1, 5, ..., 997 (steps_offset 1), 175 of them <= 700.
    assert sampling["full"]["steps"] == 250 and sampling["full"]["guided steps"] == 175
    for r in sampling.values():
        per_batch = (r["guided steps"] * r["guided step ms"] + (r["steps"] - r["guided steps"]) * r["unguided step ms"]
                     + r["decode ms"]) / 1000
        assert r["s/batch"] == pytest.approx(per_batch)
        assert r["images/s"] == pytest.approx(r["batch"] / per_batch)

    features = records(report, "features")
    assert features[0]["images/s"] > 0 and features[0]["images"] == 8
    tuning = {r["what"]: r for r in records(report, "vae_tune")}
    assert set(tuning) == {"tune_vae batch 4, speed options as configured", "tune_vae batch 4, speed options off"}
    assert all(r["it/s"] > 0 and r["ratio to train_unet"] > 0 for r in tuning.values())

    # The printed table: a row per measurement, every section named.
    for name in SECTIONS:
        assert f"[suite] {name}: " in printed
    assert "lora urepa batch 4, tf32 off" in printed and "largest LoRA urepa batch that fits" in printed


def test_what_does_not_fit_the_budget_is_listed_as_skipped_not_run(tmp_path):
    out = tmp_path / "suite.json"
    printed = run_suite(out, "--minutes", "0", "--sections", "train", "features")
    report = json.loads(out.read_text())
    train = report["sections"]["train"]
    assert train["records"] == [] and train["error"] is None
    assert len(train["skipped"]) == 8 and "lora baseline batch 4" in train["skipped"]
    assert report["sections"]["features"]["skipped"] == ["stand-in features"]  # the smoke tier's FID network
    assert printed.count("skipped: no time left") == 9


def test_a_failing_section_is_recorded_and_the_next_runs_with_the_json_written_after_each(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(SUITE.parent))
    import suite

    def fails(self, section):
        raise RuntimeError("planted")

    written, write = [], suite.Suite.write

    def spying_write(self):
        written.append(json.loads(json.dumps(self.report, default=str)))
        write(self)

    monkeypatch.setattr(suite.Suite, "caches", fails)
    monkeypatch.setattr(suite.Suite, "write", spying_write)
    report = suite.main(["--scale", "smoke", "--device", "cpu", "--minutes", "60", "--sections", "caches", "features",
                         "--out", str(tmp_path / "suite.json")])
    assert report["sections"]["caches"]["error"] == "RuntimeError: planted"
    assert report["sections"]["features"]["error"] is None and report["sections"]["features"]["records"]
    assert [list(w["sections"]) for w in written] == [["caches"], ["caches", "features"]]
    assert json.loads((tmp_path / "suite.json").read_text())["sections"]["caches"]["error"] == "RuntimeError: planted"
