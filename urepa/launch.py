"""Starting a training run on `train.processes` processes: in this process when it is 1, otherwise with
`accelerate launch` (one process per GPU, or gloo processes on the CPU for tests and CI), each running the stage's
run function (`python -m urepa.launch <stage> <threads> '<its arguments as JSON>'`): urepa.train.train_run for
`train_unet`, urepa.vae_tuning.tune_run for `tune_vae`.

Kept apart from those modules: how a run is started is not part of its training code digest."""
from __future__ import annotations

import json
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
from pathlib import Path

import torch

from .runtime import set_threads, setup_logging, start_log_file, thread_environment
from .batches import process_share
from .train import train_run


STAGES = ("train_unet", "tune_vae")


def run_function(stage: str):
    """The function every process of a `stage` run calls with the run's arguments."""
    if stage == "tune_vae":
        from .vae_tuning import tune_run
        return tune_run
    if stage == "train_unet":
        return train_run
    raise ValueError(f"unknown stage {stage!r}: one of {', '.join(STAGES)}")


def run_shape(stage: str, run_args: dict) -> tuple[int, int, int, str]:
    """(processes, global batch size, gradient accumulation, mixed precision) of a `stage` run."""
    if stage == "tune_vae":  # the tuning run takes the tier's train.processes; it does not accumulate
        unet, tune = run_args["unet_settings"], run_args["tune"]
        return unet["processes"], tune["batch_size"], 1, unet["mixed_precision"]
    settings = run_args["settings"]
    return settings["processes"], settings["batch_size"], settings["grad_accum"], settings["mixed_precision"]


def train(run_args: dict, threads: int, log_path: str | Path, stage: str = "train_unet") -> None:
    """Run `stage` as its rule asks, on train.processes processes sharing the job's `threads`.
    `run_args`: the stage's run function's arguments with the device as a string (JSON: they are handed to the
    launched processes). On several processes their output is the log file."""
    device = torch.device(run_args["device"])
    function = run_function(stage)
    processes, batch_size, grad_accum, _ = run_shape(stage, run_args)
    if processes == 1:
        setup_logging(log_path)
        set_threads(threads)
        function(**{**run_args, "device": device})
        return
    if stage == "tune_vae":  # fail before launching
        from .vae_tuning import tuning_share
        tuning_share(batch_size, 0, processes)
    else:
        process_share(batch_size, 0, processes, grad_accum)
    if device.type == "cuda":
        if device.index is not None:
            raise ValueError(f"device '{device}' names one GPU but train.processes is {processes}: use device 'cuda' "
                             f"(or auto) and choose the GPUs with CUDA_VISIBLE_DEVICES")
        if torch.cuda.device_count() < processes:
            raise ValueError(f"train.processes is {processes} but {torch.cuda.device_count()} CUDA device(s) are "
                             f"visible")
    process_threads = max(1, threads // processes)
    command = launch_command(stage, run_args, processes, process_threads, free_port())
    # Each process's BLAS and OpenMP pools start at its share of the job's threads (set_threads sets them again).
    env = {**os.environ, "TQDM_MININTERVAL": "30",  # progress lines in the log file every 30 s, not every step
           **thread_environment(process_threads)}
    with open(start_log_file(log_path), "a") as log_file:
        log_file.write(f"launching {processes} {stage} processes: {subprocess.list2cmdline(command)}\n")
        log_file.flush()
        returncode, stopped_by = run_forwarding_stop_signals(command, log_file, env)
    if returncode:
        why = f" after {signal.Signals(stopped_by).name}: they checkpointed their last step" if stopped_by else ""
        raise RuntimeError(f"the {processes} {stage} processes stopped (exit status {returncode}){why}; their output "
                           f"is in {log_path}")


def run_forwarding_stop_signals(command: list[str], log_file, env: dict) -> tuple[int, int | None]:
    """Run the launcher; the first SIGTERM or SIGUSR1 this process receives meanwhile (Slurm's preemption, a cancel)
    is passed to it as SIGTERM, which it passes to every training process: each finishes its step, checkpoints and
    stops (urepa.runstate.StopSignals; torch's launcher grants them 30 s before SIGKILL). The exit status, and the
    signal passed on (None)."""
    launcher = subprocess.Popen(command, stdout=log_file, stderr=subprocess.STDOUT, env=env)
    received = []

    def forward(number, frame):
        if not received:  # once: a second SIGTERM would cut the launcher's wait for the checkpoint short
            received.append(number)
            launcher.send_signal(signal.SIGTERM)

    main_thread = threading.current_thread() is threading.main_thread()  # where Python delivers signals
    previous = {number: signal.signal(number, forward) for number in (signal.SIGTERM, signal.SIGUSR1)} \
        if main_thread else {}
    try:
        return launcher.wait(), (received[0] if received else None)
    finally:
        for number, handler in previous.items():
            signal.signal(number, handler)


def launch_command(stage: str, run_args: dict, processes: int, threads: int, port: int) -> list[str]:
    """`accelerate launch` of this module on `processes` local processes of `threads` threads each.
    `--multi_gpu` on the CPU too: Accelerator(cpu=True) in each process then joins a gloo group (`--cpu`
    would start one process)."""
    device = torch.device(run_args["device"])
    mixed_precision = "no" if device.type == "cpu" else run_shape(stage, run_args)[3]
    return [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(processes),
            "--num_machines", "1", "--main_process_port", str(port), "--mixed_precision", mixed_precision,
            "--dynamo_backend", "no", "--module", __name__, stage, str(threads), json.dumps(run_args)]


def free_port() -> int:
    """A TCP port free now, for the process group's rendezvous: runs side by side on one node do not collide."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def main(argv: list[str]) -> None:
    """One launched process: the stage's run function with the arguments the launcher passed."""
    stage, threads, run_args = argv[0], int(argv[1]), json.loads(argv[2])
    # Every process logs its warnings; only the main process (RANK 0) tells the story.
    setup_logging(level=logging.INFO if os.environ.get("RANK", "0") == "0" else logging.WARNING)
    # The job's threads shared out, in torch and in every BLAS and OpenMP pool: Snakemake exports
    # MKL_NUM_THREADS (and others) = the job's threads, which let each process's MKL run as many threads as the
    # whole job has cores (measured on the smoke tier, 2 processes on 2 contended cores: 7-22 s a step instead
    # of ~0.7 s).
    set_threads(threads)
    run_function(stage)(**{**run_args, "device": torch.device(run_args["device"])})


if __name__ == "__main__":
    main(sys.argv[1:])
