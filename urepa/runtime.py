"""Process set-up shared by every stage: logging to the rule's log file, device and thread choice, progress bars,
provenance records, setting damaged outputs aside, and timing the phases of a step."""
from __future__ import annotations

import contextlib
import errno
import fcntl
import importlib
import io
import logging
import os
import shutil
import socket
import sys
import time
from collections import defaultdict
from pathlib import Path
from typing import TYPE_CHECKING

from threadpoolctl import threadpool_info, threadpool_limits
from tqdm import tqdm

if TYPE_CHECKING:  # torch is imported where used: the light jobs (subsets, gathering, summaries) never need it
    import torch


def setup_logging(log_path: str | Path | None = None, level: int = logging.INFO) -> None:
    """Log to stderr and, when given, to the stage's log file (created with its folder; every run's log is kept:
    `start_log_file`). Python warnings and an uncaught exception's traceback go to the log too: Snakemake points at
    the log file when a rule fails. On stderr, which the jobs Snakemake runs side by side share, each line names
    its job (`job_label`), and only the job that holds the terminal draws progress bars (`holds_terminal`)."""
    if log_path and not holds_terminal():
        _quiet_library_bars()
    console = logging.StreamHandler(sys.stderr)
    console.setFormatter(logging.Formatter(f"%(asctime)s {job_label(log_path)}%(levelname)s %(name)s: %(message)s"
                                           if log_path else FORMAT))
    handlers: list[logging.Handler] = [console]
    if log_path:  # without one (a launched training process), stderr is the log file
        console.addFilter(lambda record: not getattr(record, FILE_ONLY, False))
        handlers.append(logging.FileHandler(start_log_file(log_path), mode="a"))
    logging.basicConfig(level=level, format=FORMAT, handlers=handlers, force=True)
    logging.captureWarnings(True)
    sys.excepthook = _log_uncaught


def _quiet_library_bars() -> None:
    """Turn off the libraries' own progress bars (loading weights, downloads): in those loaded already, and through
    the environment in huggingface_hub and transformers when they load later."""
    os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] = "1"
    switches = {"huggingface_hub": ("huggingface_hub.utils", "disable_progress_bars"),
                "transformers": ("transformers.utils.logging", "disable_progress_bar"),
                "diffusers": ("diffusers.utils.logging", "disable_progress_bar")}
    for library, (module, switch) in switches.items():
        if library in sys.modules:
            getattr(importlib.import_module(module), switch)()


FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
FILE_ONLY = "file_only"  # a record with this attribute true goes to the log file, not to the terminal


def job_label(log_path: str | Path | None) -> str:
    """`[<job>] `, the job a log file belongs to, from its path: the part under `results/<tier>/` without the `logs`
    folders and the suffix (`[urepa/seed-0/sample/final/0-of-4] `); empty without a log file."""
    if not log_path:
        return ""
    parts = Path(log_path).with_suffix("").parts
    if "results" in parts[:-2]:
        parts = parts[parts.index("results") + 2:]
    return f"[{'/'.join(part for part in parts if part != 'logs')}] "


LOG_HISTORY = "history"


def start_log_file(log_path: str | Path) -> Path:
    """Create a job's log file, new and empty, and keep every run's log: the file is also linked (a hard link: one
    file, two names) as `history/<name>.<start time>.log` beside it, which stays when a rerun replaces the log
    (Snakemake deletes a job's log before it runs it again; a log left by a run outside Snakemake is moved there).
    Where the file system has no hard links, the log is kept under its own name only."""
    log_path = Path(log_path)
    history = log_path.parent / LOG_HISTORY
    history.mkdir(parents=True, exist_ok=True)
    if log_path.exists():
        started = time.localtime(log_path.stat().st_mtime)
        if log_path.stat().st_nlink > 1:  # already in the history
            log_path.unlink()
        else:
            log_path.rename(_free_name(history / f"{log_path.stem}.{time.strftime('%Y%m%d-%H%M%S', started)}"
                                       f"{log_path.suffix}"))
    log_path.touch()
    with contextlib.suppress(OSError):
        os.link(log_path, _free_name(history / f"{log_path.stem}.{time.strftime('%Y%m%d-%H%M%S')}{log_path.suffix}"))
    return log_path


def _free_name(path: Path) -> Path:
    """`path`, or `path` with `-1`, `-2`, ... before its suffix where that name is taken."""
    candidate, number = path, 1
    while candidate.exists():
        candidate, number = path.with_name(f"{path.stem}-{number}{path.suffix}"), number + 1
    return candidate


def _log_uncaught(kind, error, trace) -> None:
    if issubclass(kind, KeyboardInterrupt):
        sys.__excepthook__(kind, error, trace)
        return
    logging.getLogger("urepa").critical("stopped by %s: %s", kind.__name__, error, exc_info=(kind, error, trace))


class progress(tqdm):
    """A tqdm bar that also logs its state (done/total, rate, ETA) every `log_every` seconds and when it
    closes, so a rule's log file shows how far a job got. The bar itself is drawn only by the job that holds the
    terminal (`holds_terminal`): jobs that Snakemake runs side by side share one, and their bars would overwrite
    each other on one line. The other jobs' progress reaches the terminal as those logged lines."""

    def __init__(self, *args, log_every: float = 30.0, **kwargs):
        self._drawn = holds_terminal()
        if not self._drawn:
            kwargs["file"] = _Nowhere()
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
        # The log file gets every state; the terminal only those of a bar it does not show.
        logging.getLogger("urepa.progress").info("%s", self.format_meter(**self.format_dict),
                                                 extra={FILE_ONLY: self._drawn})


class _Nowhere(io.TextIOBase):
    """Where an undrawn bar writes."""
    encoding = "utf-8"  # as the terminal's: the logged states keep their block characters

    def write(self, text: str) -> int:
        return len(text)


_terminal_lock: list[int] = []  # the descriptor whose flock says this process draws the bars


def holds_terminal() -> bool:
    """Whether this process draws progress bars: its stderr is a terminal and it holds that terminal, the first of
    the processes sharing it to ask (an exclusive flock on the terminal device, held until the process ends)."""
    if _terminal_lock:
        return True
    try:
        if not sys.stderr.isatty():
            return False
        terminal = os.open(os.ttyname(sys.stderr.fileno()), os.O_RDONLY | os.O_NOCTTY)
    except (OSError, ValueError):  # no file descriptor behind sys.stderr (a test's capture)
        return False
    try:
        fcntl.flock(terminal, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(terminal)
        return False
    _terminal_lock.append(terminal)
    return True


class NoGPUError(RuntimeError):
    """A job that asked for a GPU sees none."""


def resolve_device(device: str, gpus: int = 0) -> torch.device:
    """'auto' means CUDA when present; the CPU only for a job that asked for no GPU (`gpus`, the rule's `gpu`
    resource: 0 on the smoke and rehearsal tiers). A real-tier job on a node without a usable GPU stops instead
    of running for days on the CPU; `device: cpu` runs it there anyway."""
    import torch

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
    import torch

    device = torch.device(device)
    record = {"threads": torch.get_num_threads(), "device": str(device), "torch": torch.__version__,
              "cuda": torch.version.cuda, "host": socket.gethostname(), **settings}
    if device.type == "cuda":
        record["device_name"] = torch.cuda.get_device_name(device)
        record["cudnn"] = torch.backends.cudnn.version()
    return record


THREAD_VARIABLES = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "GOTO_NUM_THREADS",
                    "VECLIB_MAXIMUM_THREADS", "NUMEXPR_NUM_THREADS")


def thread_environment(threads: int) -> dict[str, str]:
    """The variables that the BLAS and OpenMP libraries read when they load, set to `threads`."""
    return {name: str(max(1, threads)) for name in THREAD_VARIABLES}


def set_threads(threads: int) -> None:
    """Run this process on the job's `threads` (its rule's `threads`): torch's intra-op pool, every BLAS and
    OpenMP pool loaded so far (numpy's and scipy's OpenBLAS, torch's and scikit-learn's OpenMP: threadpoolctl),
    and, through the environment, those of libraries loaded later and of child processes. A pool wider than the
    job's cores oversubscribes them: on a loaded machine BLAS-heavy steps ran 10x slower. A job that has not
    imported torch does not import it here (light jobs start without it): torch reads OMP_NUM_THREADS when it
    loads."""
    threads = max(1, threads)
    os.environ.update(thread_environment(threads))
    threadpool_limits(threads)
    torch = sys.modules.get("torch")
    if torch is not None:
        torch.set_num_threads(threads)
    pools = ", ".join(f"{pool['internal_api']} {pool['num_threads']}" for pool in threadpool_info())
    logging.getLogger(__name__).info("threads: %d (torch %s; BLAS and OpenMP pools: %s)", threads,
                                     torch.get_num_threads() if torch is not None else "not loaded", pools,
                                     extra={FILE_ONLY: True})


def set_tf32(enabled: bool, device: torch.device) -> None:
    """TF32 tensor cores for float32 matmuls and convolutions (CUDA, Ampere and later): a 10-bit mantissa where
    float32 has 23, below the rounding bf16 autocast already applies to the U-Net's own matmuls. Process-wide."""
    import torch

    torch.backends.cuda.matmul.allow_tf32 = enabled
    torch.backends.cudnn.allow_tf32 = enabled
    if enabled and torch.device(device).type != "cuda":
        logging.getLogger(__name__).info("tf32: CUDA only, no effect on %s", device)


def pinned_memory(enabled: bool, device: torch.device) -> bool:
    """Whether a loader pins its batches (page-locked, so the copies to the device can be non-blocking): CUDA only;
    asked for on another device, it is logged as having no effect."""
    import torch

    pinned = enabled and torch.device(device).type == "cuda"
    if enabled and not pinned:
        logging.getLogger(__name__).info("pin_memory: CUDA only, no effect on %s", device)
    return pinned


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
        import torch

        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        start = time.perf_counter()
        yield
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self.totals[phase] += time.perf_counter() - start
