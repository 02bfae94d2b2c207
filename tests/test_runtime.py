"""Process set-up shared by the stages: a rule's log explains a failure and shows how far the job got."""
import subprocess
import sys
import textwrap

import pytest

from conftest import REPO

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
