"""Starting a training run on `train.processes` processes: in this process when it is 1, otherwise with
`accelerate launch` (one process per GPU, or gloo processes on the CPU for tests and CI), each running
urepa.train.train_run (`python -m urepa.launch '<train_run arguments as JSON>'`).

Kept apart from urepa.train: how a run is started is not part of its training code digest."""
from __future__ import annotations

import json
import logging
import os
import socket
import subprocess
import sys
from pathlib import Path

import torch

from .runtime import set_threads, setup_logging
from .batches import process_share
from .train import train_run


def train(run_args: dict, threads: int, log_path: str | Path) -> None:
    """Train as the train_unet rule asks, on settings["processes"] processes sharing the job's `threads`.
    `run_args`: train_run's arguments with the device as a string (JSON: they are handed to the launched
    processes). On several processes their output is the log file."""
    settings, device = run_args["settings"], torch.device(run_args["device"])
    processes = settings["processes"]
    if processes == 1:
        setup_logging(log_path)
        set_threads(threads)
        train_run(**{**run_args, "device": device})
        return
    process_share(settings["batch_size"], 0, processes, settings["grad_accum"])  # fail before launching
    if device.type == "cuda":
        if device.index is not None:
            raise ValueError(f"device '{device}' names one GPU but train.processes is {processes}: use device 'cuda' "
                             f"(or auto) and choose the GPUs with CUDA_VISIBLE_DEVICES")
        if torch.cuda.device_count() < processes:
            raise ValueError(f"train.processes is {processes} but {torch.cuda.device_count()} CUDA device(s) are "
                             f"visible")
    command = launch_command(run_args, processes, max(1, threads // processes), free_port())
    env = {**os.environ, "TQDM_MININTERVAL": "30"}  # progress lines in the log file every 30 s, not every step
    log_path = Path(log_path)
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "w") as log_file:
        log_file.write(f"launching {processes} training processes: {subprocess.list2cmdline(command)}\n")
        log_file.flush()
        returncode = subprocess.run(command, stdout=log_file, stderr=subprocess.STDOUT, env=env).returncode
    if returncode:
        raise RuntimeError(f"the {processes} training processes failed (exit status {returncode}); their output "
                           f"is in {log_path}")


def launch_command(run_args: dict, processes: int, threads: int, port: int) -> list[str]:
    """`accelerate launch` of this module on `processes` local processes of `threads` threads each.
    `--multi_gpu` on the CPU too: Accelerator(cpu=True) in each process then joins a gloo group (`--cpu`
    would start one process)."""
    device = torch.device(run_args["device"])
    mixed_precision = "no" if device.type == "cpu" else run_args["settings"]["mixed_precision"]
    return [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(processes),
            "--num_machines", "1", "--main_process_port", str(port), "--mixed_precision", mixed_precision,
            "--dynamo_backend", "no", "--module", __name__, str(threads), json.dumps(run_args)]


def free_port() -> int:
    """A TCP port free now, for the process group's rendezvous: runs side by side on one node do not collide."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def main(argv: list[str]) -> None:
    """One launched process: train_run with the arguments the launcher passed."""
    threads, run_args = int(argv[0]), json.loads(argv[1])
    # The job's threads shared out. Set here, not by environment: Snakemake exports MKL_NUM_THREADS (and
    # others) = the job's threads, which let each process's MKL run as many threads as the whole job has
    # cores (measured on the smoke tier, 2 processes on 2 contended cores: 7-22 s a step instead of ~0.7 s).
    set_threads(threads)
    # Every process logs its warnings; only the main process (RANK 0) tells the story.
    setup_logging(level=logging.INFO if os.environ.get("RANK", "0") == "0" else logging.WARNING)
    train_run(**{**run_args, "device": torch.device(run_args["device"])})


if __name__ == "__main__":
    main(sys.argv[1:])
