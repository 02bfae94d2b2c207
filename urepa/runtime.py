"""Process set-up shared by every stage: logging to the rule's log file, device and thread choice, progress bars,
provenance records, setting damaged outputs aside, and timing the phases of a step."""
from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import os
import shutil
import socket
import sys
import time
from collections import defaultdict
from pathlib import Path

import torch
from tqdm import tqdm


def setup_logging(log_path: str | Path | None = None, level: int = logging.INFO) -> None:
    """Log to stderr and, when given, to the stage's log file (created with its folder). Python warnings and
    an uncaught exception's traceback go to the log too: Snakemake points at the log file when a rule fails."""
    handlers: list[logging.Handler] = [logging.StreamHandler(sys.stderr)]
    if log_path:
        Path(log_path).parent.mkdir(parents=True, exist_ok=True)
        handlers.append(logging.FileHandler(log_path, mode="w"))
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        handlers=handlers, force=True)
    logging.captureWarnings(True)
    sys.excepthook = _log_uncaught


def _log_uncaught(kind, error, trace) -> None:
    if issubclass(kind, KeyboardInterrupt):
        sys.__excepthook__(kind, error, trace)
        return
    logging.getLogger("urepa").critical("stopped by %s: %s", kind.__name__, error, exc_info=(kind, error, trace))


class progress(tqdm):
    """A tqdm bar that also logs its state (done/total, rate, ETA) every `log_every` seconds and when it
    closes, so a rule's log file shows how far a job got; the bar itself goes to the terminal only."""

    def __init__(self, *args, log_every: float = 30.0, **kwargs):
        super().__init__(*args, **kwargs)
        self._log_every, self._logged_at = log_every, time.monotonic()

    def update(self, n: float = 1):
        displayed = super().update(n)
        if not self.disable and time.monotonic() - self._logged_at >= self._log_every:
            self._log_state()
        return displayed

    def close(self) -> None:
        if not self.disable and not getattr(self, "_closed_logged", False):
            self._closed_logged = True
            self._log_state()
        super().close()

    def _log_state(self) -> None:
        self._logged_at = time.monotonic()
        logging.getLogger("urepa.progress").info("%s", self.format_meter(**self.format_dict))


class NoGPUError(RuntimeError):
    """A job that asked for a GPU sees none."""


def resolve_device(device: str, gpus: int = 0) -> torch.device:
    """'auto' means CUDA when present; the CPU only for a job that asked for no GPU (`gpus`, the rule's `gpu`
    resource: 0 on the smoke and rehearsal tiers). A real-tier job on a node without a usable GPU stops instead
    of running for days on the CPU; `device: cpu` runs it there anyway."""
    if device != "auto":
        return torch.device(device)
    if torch.cuda.is_available():
        return torch.device("cuda")
    if gpus > 0:
        raise NoGPUError(
            f"this job asked for {gpus} GPU(s) (config `resources`) but sees no CUDA device (torch "
            f"{torch.__version__}, CUDA build {torch.version.cuda}, CUDA_VISIBLE_DEVICES="
            f"{os.environ.get('CUDA_VISIBLE_DEVICES', '<unset>')}). Run it on a GPU node, or set "
            f"`--config device=cpu` to run it on the CPU anyway.")
    return torch.device("cpu")


def provenance(device: torch.device | str, **settings) -> dict:
    """What changes an output's bytes beyond its inputs and settings (the last bits of floating-point sums follow
    the thread count, the batch size, the device and the library build), recorded beside the output."""
    device = torch.device(device)
    record = {"threads": torch.get_num_threads(), "device": str(device), "torch": torch.__version__,
              "cuda": torch.version.cuda, "host": socket.gethostname(), **settings}
    if device.type == "cuda":
        record["device_name"] = torch.cuda.get_device_name(device)
        record["cudnn"] = torch.backends.cudnn.version()
    return record


def set_threads(threads: int) -> None:
    torch.set_num_threads(max(1, threads))


def set_tf32(enabled: bool, device: torch.device) -> None:
    """TF32 tensor cores for float32 matmuls and convolutions (CUDA, Ampere and later): a 10-bit mantissa where
    float32 has 23, below the rounding bf16 autocast already applies to the U-Net's own matmuls. Process-wide."""
    torch.backends.cuda.matmul.allow_tf32 = enabled
    torch.backends.cudnn.allow_tf32 = enabled
    if enabled and torch.device(device).type != "cuda":
        logging.getLogger(__name__).info("tf32: CUDA only, no effect on %s", device)


class DiskFullError(OSError):
    """A write that failed for want of space (or quota); the message names the file system and the path."""


def mount_point(path: str | Path) -> Path:
    """The mount point of the file system `path` is (or would be) on."""
    path = Path(path).absolute()
    while not path.exists():
        path = path.parent
    while not os.path.ismount(path):
        path = path.parent
    return path


def is_disk_full(error: BaseException) -> bool:
    if isinstance(error, OSError):
        return error.errno in (errno.ENOSPC, errno.EDQUOT)
    # torch.save's C++ writer reports a short write without an errno ("unexpected pos ... vs ...")
    return isinstance(error, RuntimeError) and any(
        text in str(error) for text in ("unexpected pos", "PytorchStreamWriter failed", "No space left"))


@contextlib.contextmanager
def disk_full_named(path: str | Path):
    """Within the block, a write that fails for want of space raises `DiskFullError` saying "no space left on
    <mount point>: <file>" (the failing file where the error names it, else `path`), instead of a bare errno or
    torch's serialisation error."""
    try:
        yield
    except (OSError, RuntimeError) as error:
        if isinstance(error, DiskFullError) or not is_disk_full(error):
            raise
        target = Path(getattr(error, "filename", None) or path)
        where = mount_point(target)
        free = shutil.disk_usage(where).free
        raise DiskFullError(errno.ENOSPC, f"no space left on {where}: {target} ({free / 2**30:.2f} GiB free there "
                                          f"now; free some, or point results/ at a larger file system, and run "
                                          f"again: finished work is kept)") from error


def set_aside(path: str | Path, reason: str) -> Path:
    """Move unfinished work that belongs to something else out of the way (`<name>.stale-<time>`) instead of
    deleting it or continuing it: hours of GPU work are never thrown away, and never mixed into another run."""
    path = Path(path)
    stale = path.with_name(f"{path.name}.stale-{time.strftime('%Y%m%d-%H%M%S')}")
    suffix = 1
    while stale.exists():
        stale, suffix = stale.with_name(f"{stale.name}-{suffix}"), suffix + 1
    path.rename(stale)
    logging.getLogger(__name__).warning("%s %s: moved to %s", path, reason, stale)
    return stale


RESULTS_LOCK = ".urepa.lock"
_held_locks: list = []  # open handles keep their flock for the life of the process


class ResultsFolderBusy(RuntimeError):
    """Another invocation is working on the same results folder."""


def lock_results_folder(folder: str | Path) -> None:
    """Take an exclusive, non-blocking OS lock (flock) on `folder` for the rest of this process.

    Snakemake's own lock is checked and then written, not taken atomically: two invocations started in the
    same second both pass it, and one's cleanup can delete what the other has just finished. flock is
    atomic, and the kernel releases it when the holder dies, so a killed run never leaves it stale."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    handle = open(folder / RESULTS_LOCK, "a+")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.seek(0)
        holder = handle.read().strip() or "another process"
        handle.close()
        raise ResultsFolderBusy(
            f"{folder}/ is in use by another snakemake invocation ({holder}). One results folder takes one "
            f"invocation at a time: wait for it to finish or stop it. Nothing was started or deleted.") from None
    handle.seek(0)
    handle.truncate()
    handle.write(f"pid {os.getpid()} on {os.uname().nodename}, since {time.strftime('%Y-%m-%d %H:%M:%S')}\n")
    handle.flush()
    _held_locks.append(handle)


class PhaseTimer:
    """Wall time per phase of a step; synchronises CUDA so a phase is charged for its own kernels."""

    def __init__(self, enabled: bool, device: torch.device):
        self.enabled, self.device = enabled, device
        self.totals: dict[str, float] = defaultdict(float)

    @contextlib.contextmanager
    def __call__(self, phase: str):
        if not self.enabled:
            yield
            return
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        start = time.perf_counter()
        yield
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self.totals[phase] += time.perf_counter() - start
