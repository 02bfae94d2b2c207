"""The workflow as a whole: one invocation per results folder."""
import fcntl
import shutil
import subprocess
import sys

from conftest import REPO
from urepa.runtime import RESULTS_LOCK


def snakemake(workdir, *args):
    return subprocess.run([sys.executable, "-m", "snakemake", "-s", str(REPO / "Snakefile"), "-d", str(workdir),
                           "--cores", "1", *args], capture_output=True, text=True, timeout=600)


def test_a_second_invocation_stops_at_once_and_deletes_nothing(tmp_path):
    """While one invocation holds the results folder, another that would rebuild a finished output (here a
    forced rerun of the smoke tree) stops before any job, with a message, and the output is untouched."""
    shutil.copytree(REPO / "config", tmp_path / "config")
    finished = tmp_path / "results" / "smoke" / "inputs" / "imagenet"
    finished.mkdir(parents=True)
    (finished / "finished.txt").write_text("hours of work")
    with open(tmp_path / "results" / RESULTS_LOCK, "a+") as running:
        running.write("pid 4242 on gpu-node-7, since 2026-11-23 09:00:00\n")
        running.flush()
        fcntl.flock(running, fcntl.LOCK_EX | fcntl.LOCK_NB)  # what the first invocation holds
        second = snakemake(tmp_path, "results/smoke/inputs/imagenet", "--forcerun", "generated_imagenet")
    assert second.returncode != 0
    output = second.stdout + second.stderr
    assert "in use by another snakemake invocation (pid 4242 on gpu-node-7" in output
    assert "Nothing was started or deleted" in output
    assert (finished / "finished.txt").read_text() == "hours of work"
    # The lock dies with its holder: the next invocation runs.
    third = snakemake(tmp_path, "results/smoke/inputs/imagenet", "--forcerun", "generated_imagenet")
    assert third.returncode == 0, third.stderr[-2000:]
    assert (finished / "Data" / "CLS-LOC" / "train").is_dir()
