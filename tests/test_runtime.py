"""Process set-up shared by the stages: a rule's log explains a failure and shows how far the job got."""
import errno
import json
import logging
import subprocess
import sys
import textwrap

import pytest
import torch

from conftest import REPO
from urepa.runtime import DiskFullError, disk_full_named, mount_point, setup_logging

FAILING_STAGE = textwrap.dedent("""
    import sys, warnings
    from urepa.runtime import progress, setup_logging
    setup_logging(sys.argv[1])
    for _ in progress(range(5), desc="encode", unit="batch", log_every=0.0):
        pass
    warnings.warn("tokens of row 3 look odd")
    raise ValueError("cache row 7 holds NaN")
""")


def test_a_failing_stage_leaves_progress_warnings_and_its_traceback_in_the_log(tmp_path):
    script, log = tmp_path / "stage.py", tmp_path / "logs" / "stage.log"
    script.write_text(FAILING_STAGE)
    result = subprocess.run([sys.executable, str(script), str(log)], capture_output=True, text=True, cwd=REPO,
                            env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"})
    assert result.returncode != 0
    text = log.read_text()
    assert "encode: 100%" in text and "5/5" in text  # done / total, with rate and ETA fields
    assert "tokens of row 3 look odd" in text
    assert "Traceback (most recent call last)" in text and "ValueError: cache row 7 holds NaN" in text
    assert "stopped by ValueError" in text


def test_auto_device_refuses_the_cpu_for_a_job_that_asked_for_a_gpu(monkeypatch):
    import torch

    from urepa.runtime import NoGPUError, resolve_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("auto", 0) == torch.device("cpu")  # smoke / rehearsal jobs ask for no GPU
    with pytest.raises(NoGPUError, match=r"asked for 2 GPU\(s\).*--config device=cpu"):
        resolve_device("auto", 2)
    assert resolve_device("cpu", 1) == torch.device("cpu")  # asked for explicitly
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert resolve_device("auto", 1) == torch.device("cuda")


def test_provenance_records_what_changes_the_bytes():
    import torch

    from urepa.runtime import provenance

    torch.set_num_threads(1)
    record = provenance("cpu", batch_size=16)
    assert record["threads"] == 1 and record["batch_size"] == 16 and record["device"] == "cpu"
    assert record["torch"] == torch.__version__ and record["host"]


@pytest.mark.parametrize("error", [
    OSError(errno.ENOSPC, "No space left on device"),  # what a cache shard or PNG write raises: no path
    RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598"),  # torch.save's
    OSError(errno.EDQUOT, "Disk quota exceeded"),
])
def test_a_full_disk_is_named_with_its_file_system_and_path(error, tmp_path):
    target = tmp_path / "checkpoint-8.tmp"
    with pytest.raises(DiskFullError, match=rf"no space left on {mount_point(tmp_path)}: {target} \(") as raised:
        with disk_full_named(target):
            raise error
    assert raised.value.errno == errno.ENOSPC and raised.value.__cause__ is error
    with pytest.raises(PermissionError):  # any other failure passes through unchanged
        with disk_full_named(target):
            raise PermissionError(errno.EACCES, "Permission denied")


def test_a_full_disk_while_checkpointing_names_the_checkpoint_and_keeps_the_previous_one(tmp_path, monkeypatch):
    from accelerate import Accelerator

    from urepa.runstate import complete_checkpoints, save_checkpoint

    accelerator = Accelerator(cpu=True)
    accelerator.prepare(torch.nn.Linear(2, 2))
    save_checkpoint(accelerator, tmp_path, 1, keep=2)

    def full(*args, **kwargs):
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598")

    monkeypatch.setattr(accelerator, "save_state", full)
    with pytest.raises(DiskFullError, match=r"no space left on .*checkpoints/checkpoint-2\.tmp"):
        save_checkpoint(accelerator, tmp_path, 2, keep=2)
    assert [p.name for p in complete_checkpoints(tmp_path)] == ["checkpoint-1"]


def test_the_rule_log_survives_a_full_disk(tmp_path, monkeypatch, capfd):
    """A log line that cannot be written is reported on stderr; the job goes on (and fails on its own error)."""
    root = logging.getLogger()
    monkeypatch.setattr(sys, "excepthook", sys.excepthook)  # setup_logging's changes, undone after the test
    monkeypatch.setattr(root, "handlers", list(root.handlers))
    setup_logging(tmp_path / "rule.log")
    logging.captureWarnings(False)
    (file_handler,) = [h for h in root.handlers if isinstance(h, logging.FileHandler)]

    def full(text):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(file_handler.stream, "write", full)
    logging.getLogger("urepa").warning("still running")
    assert "still running" in capfd.readouterr().err
    file_handler.close()


THREAD_REPORT = ("import json, numpy, scipy.linalg, sklearn.decomposition, torch; "
                 "from threadpoolctl import threadpool_info; "
                 "print(json.dumps({'torch': torch.get_num_threads(), 'pools': threadpool_info()}))")

JOB_START = textwrap.dedent(f"""
    import subprocess, sys
    import numpy, torch  # loaded before the job sets its threads, as a script's imports are
    from urepa.runtime import set_threads, setup_logging
    setup_logging(sys.argv[1])
    set_threads(int(sys.argv[2]))
    exec({THREAD_REPORT!r})  # loads scipy's OpenBLAS and scikit-learn's OpenMP only now
    sys.stdout.flush()
    subprocess.run([sys.executable, "-c", {THREAD_REPORT!r}], check=True)  # a process the job starts
""")


@pytest.mark.parametrize("threads", [1, 2])
def test_a_job_runs_torch_and_every_blas_and_openmp_pool_on_its_threads(threads, tmp_path):
    """A job started with wider pools than its share (a launched training process inherits its whole job's
    OMP_NUM_THREADS and MKL_NUM_THREADS): after set_threads, torch, the BLAS and OpenMP pools loaded before and
    after, and those of a process it starts, all run on its threads."""
    from urepa.runtime import THREAD_VARIABLES

    script, log = tmp_path / "job.py", tmp_path / "logs" / "job.log"
    script.write_text(JOB_START)
    env = {"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin", **{name: "3" for name in THREAD_VARIABLES}}
    result = subprocess.run([sys.executable, str(script), str(log), str(threads)], capture_output=True, text=True,
                            cwd=REPO, env=env, check=True)
    reports = [json.loads(line) for line in result.stdout.splitlines()]
    assert len(reports) == 2  # the job's and its child's
    for report in reports:
        assert report["torch"] == threads
        assert {pool["user_api"] for pool in report["pools"]} == {"blas", "openmp"}
        assert {pool["filepath"]: pool["num_threads"] for pool in report["pools"]} == \
            {pool["filepath"]: threads for pool in report["pools"]}
    assert f"threads: {threads} (torch {threads}; BLAS and OpenMP pools: " in log.read_text()


def test_every_runs_log_is_kept_when_a_rerun_replaces_it(tmp_path):
    from urepa.runtime import start_log_file

    log = tmp_path / "logs" / "train_unet.log"
    log.parent.mkdir()
    log.write_text("a log written before logs were kept\n")
    start_log_file(log).write_text("first run\n")
    log.unlink()  # what Snakemake does before it reruns a job
    with open(start_log_file(log), "a") as second:
        second.write("second run\n")
    assert log.read_text() == "second run\n"
    kept = {path.read_text(): path for path in (log.parent / "history").iterdir()}
    assert sorted(kept) == ["a log written before logs were kept\n", "first run\n", "second run\n"]
    assert all(path.name.startswith("train_unet.") and path.suffix == ".log" for path in kept.values())
    assert kept["second run\n"].samefile(log)  # the running job's log is one file with two names: no copy
    start_log_file(log)  # a rerun outside Snakemake, which leaves the log in place
    assert log.read_text() == "" and kept["second run\n"].read_text() == "second run\n"
    assert len(list((log.parent / "history").iterdir())) == 4


TERMINAL_CLAIM = textwrap.dedent("""
    import sys
    from urepa.runtime import holds_terminal
    print(holds_terminal(), flush=True)
    sys.stdin.readline()  # hold on until told to end
""")


def test_one_of_the_jobs_sharing_a_terminal_draws_the_bars(tmp_path):
    """Jobs that Snakemake runs side by side share its terminal: the first to ask draws its bars and holds the
    terminal until it ends, the others log whole lines instead; a job whose stderr is no terminal draws none."""
    import os
    import pty

    script = tmp_path / "claim.py"
    script.write_text(TERMINAL_CLAIM)
    controller, terminal = pty.openpty()
    env = {"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"}

    def job(stderr) -> subprocess.Popen:
        return subprocess.Popen([sys.executable, str(script)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                stderr=stderr, text=True, cwd=REPO, env=env)

    side_by_side = [job(terminal) for _ in range(2)]
    claims = [running.stdout.readline().strip() for running in side_by_side]  # both alive: both have asked
    for running in side_by_side:
        running.communicate("\n", timeout=60)
    assert sorted(claims) == ["False", "True"]
    assert job(terminal).communicate("\n", timeout=60)[0].strip() == "True"  # the holder ended: free again
    os.close(terminal), os.close(controller)
    assert job(subprocess.PIPE).communicate("\n", timeout=60)[0].strip() == "False"


SAMPLE_SHARD = textwrap.dedent("""
    from urepa.runtime import progress, set_threads, setup_logging
    setup_logging("results/smoke/urepa/seed-0/logs/sample/final/0-of-4.log")
    set_threads(1)
    for _ in progress(range(3), desc="sample", unit="batch"):
        pass
""")


def test_a_job_without_the_terminal_reports_progress_in_whole_lines_that_name_it(tmp_path):
    """Jobs side by side on one terminal: a job that does not draw bars (here its stderr is a pipe) shows its
    progress as log lines headed by its name; the log file has the same lines, and those meant for it alone."""
    result = subprocess.run([sys.executable, "-c", SAMPLE_SHARD], capture_output=True, text=True, cwd=tmp_path,
                            env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"}, check=True)
    assert "\r" not in result.stderr
    assert "[urepa/seed-0/sample/final/0-of-4] INFO urepa.progress: sample: 100%" in result.stderr
    assert "threads: 1" not in result.stderr
    log = (tmp_path / "results/smoke/urepa/seed-0/logs/sample/final/0-of-4.log").read_text()
    assert "INFO urepa.progress: sample: 100%" in log and "3/3" in log and "threads: 1 (torch " in log
