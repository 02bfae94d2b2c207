"""Stage 3 on several processes and with gradient accumulation: the same run as on one process.

End to end on the smoke tier's settings (batch 8, lr 3e-3; 10 steps, warm-up 3 steps, so that the warm-up
shows in the LR): two CPU processes under `accelerate launch` and grad_accum=2 give the one-process per-step
losses and final EMA weights, the LR schedule advances once per optimiser step, and a run resumes on another
process count (2 -> 1, 1 -> 2). (tests/test_batches.py: the manifold term of a split batch, gradient included, and
each process's share of the step's batch.)

Several training runs, some in child processes: minutes. Marked slow (tools/mutation.py leaves them out).
"""
from __future__ import annotations

import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import torch
from safetensors.torch import load_file

from conftest import CONFIG, CPU, DINO_SIZE, REPO, SEED, SMOKE_IMAGE_SIZE
from urepa import launch
from urepa.config import train_settings
from urepa.train import train_run

pytestmark = pytest.mark.slow


LOSSES = ["loss", "loss_diff", "loss_token", "loss_manifold", "grad_norm"]


WEIGHTS = ["ema/pytorch_lora_weights.safetensors", "ema/align_heads.safetensors"]


def smoke_settings(**overrides) -> dict:
    settings = train_settings(CONFIG, "smoke", "urepa")
    assert settings["batch_size"] == 8 and settings["manifold_mode"] == "sample"
    settings.update({"max_steps": 10, "warmup_ratio": 0.3, "checkpoint_every": 5, "eval_interval": 10, **overrides})
    return settings


def run_args(smoke_inputs, smoke_caches, settings, out: Path) -> dict:
    """train_run's arguments, as the train_unet rule hands them to urepa.launch.train."""
    return {"caches": {name: str(smoke_caches[name]) for name in ("csv", "vae", "dino", "clip")},
            "sd15_dir": str(smoke_inputs["sd15"]), "dinov2_path": str(smoke_inputs["dinov2"]),
            "vae_dir": str(smoke_inputs["sd15"] / "vae"), "settings": settings,
            "states_dir": str(out / "train_state"), "model_dir": str(out / "model"), "seed": SEED, "device": "cpu",
            "num_workers": 0, "title": "test", "image_size": SMOKE_IMAGE_SIZE, "dino_size": DINO_SIZE,
            "report_to": "none"}


def run_in_process(smoke_inputs, smoke_caches, settings, out: Path) -> Path:
    args = run_args(smoke_inputs, smoke_caches, settings, out)
    return train_run(**{**args, "device": CPU})


def state_of(out: Path) -> Path:
    (state,) = [marker.parent for marker in (out / "train_state").glob("*/run.json")]
    return state


def assert_same_run(reference: Path, other: Path, steps=None) -> None:
    """Per-step losses within rtol 1e-4 and final EMA weights within rtol 1e-3 (with an absolute floor of
    1e-2 of each tensor's mean magnitude) of the reference run's. The floor is for entries whose gradient is near
    zero: Adam turns the last-bit differences of another summation order (two processes' all-reduce, another
    thread count) into updates of up to lr per step there; a wrong batch or reduction moves the losses first."""
    log_a = pd.read_csv(state_of(reference) / "train_log.csv")
    log_b = pd.read_csv(state_of(other) / "train_log.csv")
    assert log_b["step"].tolist() == log_a["step"].tolist()
    rows = log_a["step"].isin(steps) if steps else slice(None)
    for column in LOSSES:
        torch.testing.assert_close(torch.tensor(log_b.loc[rows, column].to_numpy()),
                                   torch.tensor(log_a.loc[rows, column].to_numpy()), rtol=1e-4, atol=0,
                                   msg=lambda m: f"{column}: {m}")
    for name in WEIGHTS:
        a, b = load_file(reference / "model" / name), load_file(other / "model" / name)
        assert a.keys() == b.keys() and a
        for key in a:
            torch.testing.assert_close(b[key], a[key], rtol=1e-3, atol=1e-2 * a[key].abs().mean().item(),
                                       msg=lambda m: f"{name} {key}: {m}")


@pytest.fixture(scope="module")
def one_process(smoke_inputs, smoke_caches, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("one_process")
    run_in_process(smoke_inputs, smoke_caches, smoke_settings(), out)
    return out


@pytest.fixture(scope="module")
def two_processes(smoke_inputs, smoke_caches, tmp_path_factory) -> Path:
    """The same run on two gloo processes, launched as the train_unet rule launches it."""
    out = tmp_path_factory.mktemp("two_processes")
    launch.train(run_args(smoke_inputs, smoke_caches, smoke_settings(processes=2), out), threads=2,
                 log_path=out / "train.log")
    return out


def how(launch: dict) -> dict:
    """A launch record's process count, accumulation and first step (without its provenance)."""
    return {key: launch[key] for key in ("processes", "grad_accum", "from_step")}


def test_two_processes_give_the_one_process_losses_and_ema_weights(one_process, two_processes):
    assert_same_run(one_process, two_processes)
    assert "launching 2 train_unet processes" in (two_processes / "train.log").read_text()
    # One identity whatever the process count; run.json records how the run was launched.
    assert state_of(one_process).name == state_of(two_processes).name
    run = json.loads((state_of(two_processes) / "run.json").read_text())
    assert [how(launch) for launch in run["launches"]] == [{"processes": 2, "grad_accum": 1, "from_step": 0}]
    assert run["launches"][0]["device"] == "cpu"  # provenance
    # The job's 2 threads shared by its 2 processes, in torch and in every BLAS and OpenMP pool.
    assert run["launches"][0]["threads"] == 1
    assert "threads: 1 (torch 1; BLAS and OpenMP pools: " in (two_processes / "train.log").read_text()
    assert "processes" not in run["settings"] and "grad_accum" not in run["settings"]


def test_lr_schedule_steps_once_per_optimiser_step(one_process, two_processes):
    """Linear warm-up over 3 steps, then cosine to 0 at step 10, in optimiser steps on any process count."""
    settings = smoke_settings()
    base, warmup, total = settings["learning_rate"], 3, settings["max_steps"]
    expected = [base * step / warmup if step < warmup else
                base * 0.5 * (1 + math.cos(math.pi * (step - warmup) / (total - warmup))) for step in range(1, 11)]
    for out in (one_process, two_processes):
        logged = pd.read_csv(state_of(out) / "train_log.csv")["lr"].tolist()
        assert logged == pytest.approx(expected, rel=1e-12, abs=1e-15), out.name


def test_grad_accum_gives_the_same_result_at_the_same_effective_batch(one_process, smoke_inputs, smoke_caches,
                                                                      tmp_path):
    run_in_process(smoke_inputs, smoke_caches, smoke_settings(grad_accum=2), tmp_path)
    assert_same_run(one_process, tmp_path)
    assert json.loads((state_of(tmp_path) / "run.json").read_text())["launches"][0]["grad_accum"] == 2


def test_a_run_started_on_two_processes_resumes_on_one(one_process, two_processes, smoke_inputs, smoke_caches,
                                                       tmp_path):
    """The two-process run as if killed after checkpoint-5, resumed on one process: the same state folder
    (identity) carries on, and ends where the one-process run ended."""
    state = tmp_path / "train_state" / state_of(two_processes).name
    shutil.copytree(state_of(two_processes), state)
    shutil.rmtree(state / "checkpoints" / "checkpoint-10")
    assert run_in_process(smoke_inputs, smoke_caches, smoke_settings(), tmp_path) == state
    assert_same_run(one_process, tmp_path, steps=range(6, 11))
    launches = [how(launch) for launch in json.loads((state / "run.json").read_text())["launches"]]
    assert launches == [{"processes": 2, "grad_accum": 1, "from_step": 0},
                        {"processes": 1, "grad_accum": 1, "from_step": 5}]


def test_a_run_started_on_one_process_resumes_on_two(one_process, smoke_inputs, smoke_caches, tmp_path):
    """The other way round: every process loads the one-process checkpoint-5 and carries on."""
    state = tmp_path / "train_state" / state_of(one_process).name
    shutil.copytree(state_of(one_process), state)
    shutil.rmtree(state / "checkpoints" / "checkpoint-10")
    launch.train(run_args(smoke_inputs, smoke_caches, smoke_settings(processes=2), tmp_path), threads=2,
                 log_path=tmp_path / "train.log")
    assert "resumed from" in (tmp_path / "train.log").read_text()
    assert_same_run(one_process, tmp_path, steps=range(6, 11))
    assert how(json.loads((state / "run.json").read_text())["launches"][-1]) == {"processes": 2, "grad_accum": 1,
                                                                              "from_step": 5}


def test_a_batch_that_does_not_split_evenly_is_refused_before_any_work(smoke_inputs, smoke_caches, tmp_path):
    expected = r"train.batch_size 8 does not divide by train.processes x train.grad_accum = 3 x 1 = 3"
    with pytest.raises(ValueError, match=expected):
        launch.train(run_args(smoke_inputs, smoke_caches, smoke_settings(processes=3), tmp_path), threads=1,
                     log_path=tmp_path / "train.log")
    assert not (tmp_path / "train.log").exists()  # nothing was launched
    with pytest.raises(ValueError, match=r"= 1 x 3 = 3: every process takes an equal share"):
        run_in_process(smoke_inputs, smoke_caches, smoke_settings(grad_accum=3), tmp_path)
    assert not (tmp_path / "train_state").exists()
    # A run whose processes setting is not the process count it runs on (not started by urepa.launch).
    with pytest.raises(ValueError, match="train.processes is 2 but this run has 1 process"):
        run_in_process(smoke_inputs, smoke_caches, smoke_settings(processes=2), tmp_path)


LAUNCHER = """
import json, sys
from urepa import launch
from urepa.runtime import setup_logging
setup_logging()
launch.train(json.load(open(sys.argv[1])), threads=2, log_path=sys.argv[2])
"""


def test_a_signalled_two_process_run_checkpoints_its_step_and_resumes_to_the_same_result(
        one_process, smoke_inputs, smoke_caches, tmp_path):
    """SIGTERM to the job's process (what Slurm's preemption sends): the launcher hands it to both training
    processes, which finish their step, checkpoint it and stop; the job fails (so it is retried) and the rerun
    resumes from that step and ends where the uninterrupted one-process run ended."""
    settings = smoke_settings(processes=2, eval_interval=2, checkpoint_every=10)
    args = run_args(smoke_inputs, smoke_caches, settings, tmp_path)
    (tmp_path / "args.json").write_text(json.dumps(args))
    (tmp_path / "launcher.py").write_text(LAUNCHER)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    with open(tmp_path / "job.log", "wb") as job_log:
        job = subprocess.Popen([sys.executable, str(tmp_path / "launcher.py"), str(tmp_path / "args.json"),
                                str(tmp_path / "train.log")], stdout=job_log, stderr=subprocess.STDOUT, env=env)
    deadline = time.monotonic() + 300
    while not any((tmp_path / "train_state").glob("*/snapshots/step-0000002")) and time.monotonic() < deadline:
        assert job.poll() is None, (tmp_path / "train.log").read_text()[-3000:]
        time.sleep(0.01)
    job.send_signal(signal.SIGTERM)
    assert job.wait(timeout=300) == 1, (tmp_path / "job.log").read_text()[-3000:]
    assert "stopped (exit status" in (tmp_path / "job.log").read_text() and "after SIGTERM" in \
        (tmp_path / "job.log").read_text()
    (checkpoint,) = (state_of(tmp_path) / "checkpoints").glob("checkpoint-*")
    stopped_at = int(checkpoint.name.split("-")[1])
    assert 2 <= stopped_at < 10 and f"after step {stopped_at}" in (tmp_path / "train.log").read_text()

    launch.train(args, threads=2, log_path=tmp_path / "train.log")
    launches = json.loads((state_of(tmp_path) / "run.json").read_text())["launches"]
    assert [launch["from_step"] for launch in launches] == [0, stopped_at]
    assert_same_run(one_process, tmp_path)
