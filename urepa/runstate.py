"""A training run's state folder: its identity (settings, seed, data with the caches' contents, training code), the
folder named by that identity with its run.json, and the complete checkpoints in it. Snakemake does not see
inside a run; this is what lets a killed, requeued or repeated run find its own state and nobody else's."""
from __future__ import annotations

import hashlib
import json
import logging
import re
import shutil
import signal
import threading
from pathlib import Path

import torch

from .digests import file_digest
from .runtime import disk_full_named, progress, set_aside

log = logging.getLogger(__name__)

# The modules that define the objective, the model, the step and its batches.
TRAINING_CODE = ("losses.py", "models.py", "train.py", "batches.py")


def training_code_digest(files: tuple[str, ...] = TRAINING_CODE) -> str:
    """SHA-256 of the modules that define the objective, the model and the loop (`files`, in the package). Part
    of a run's identity:
    Snakemake does not see edits inside the package, and resuming old state after such an edit would mix
    two objectives in one set of weights."""
    digest = hashlib.sha256()
    for name in files:
        digest.update((Path(__file__).parent / name).read_bytes())
    return digest.hexdigest()[:16]


def run_state_dir(states_dir: Path, identity: dict) -> Path:
    return states_dir / hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:16]


def complete_checkpoints(run_dir: Path) -> list[Path]:
    """A run state's complete checkpoints, oldest first (a half-written one is named *.tmp, one set aside
    *.stale-<time>)."""
    found = [p for p in (run_dir / "checkpoints").glob("checkpoint-*") if re.fullmatch(r"checkpoint-\d+", p.name)]
    return sorted(found, key=lambda p: int(p.name.split("-")[1]))


def claim_run_state(states_dir: Path, identity: dict, launch: dict) -> Path:
    """The state folder of the run with this identity (settings, seed, data with the caches' contents,
    training code): `states_dir/<digest of the identity>/`, with the identity in its run.json.

    Every identity keeps its own folder, so state is resumed only by the very same run, never mixed with
    another's, and going back to a setting finds its run where it was left: a finished one is re-exported
    at once instead of being trained again (on tierB that is days).

    How the run is executed (`launch`: process count, gradient accumulation) is not identity: it changes the
    weights only by floating-point reordering, as GPU kernels themselves do, and a preempted job requeued on
    fewer GPUs must resume, not start over. run.json records it under "launches", with the step each start
    of the run trained from."""
    run_dir = run_state_dir(states_dir, identity)
    marker = run_dir / "run.json"
    others = sorted(p.parent.name for p in states_dir.glob("*/run.json") if p.parent != run_dir)
    launches = []
    if marker.exists():
        recorded = json.loads(marker.read_text())
        launches = recorded.pop("launches", [])
        if json.dumps(recorded, sort_keys=True) != json.dumps(identity, sort_keys=True):
            set_aside(run_dir, "records another identity than its name says")
            launches = []
        else:
            log.info("run state %s: this identity's state, resumed where it was left", run_dir)
    else:
        log.info("run state %s: new identity, training from step 0%s", run_dir,
                 f" (states of other identities kept beside it: {', '.join(others)})" if others else "")
    run_dir.mkdir(parents=True, exist_ok=True)
    checkpoints = complete_checkpoints(run_dir)
    from_step = int(checkpoints[-1].name.split("-")[1]) if checkpoints else 0
    marker.write_text(json.dumps({**identity, "launches": [*launches, {**launch, "from_step": from_step}]},
                                 indent=2, sort_keys=True))
    return run_dir


class CheckpointError(RuntimeError):
    """Checkpoints were found but none is intact."""


class Preempted(RuntimeError):
    """The run was asked to stop (SIGTERM, SIGUSR1) and stopped after checkpointing its last step."""


# Written into a checkpoint before the rename that completes it: every file's SHA-256.
CHECKSUMS = "checksums.json"


def write_checksums(folder: Path) -> None:
    files = sorted(p for p in folder.rglob("*") if p.is_file() and p.name != CHECKSUMS)
    sums = {str(p.relative_to(folder)): file_digest(p) for p in progress(files, desc="checkpoint checksums",
                                                                         unit="file", leave=False)}
    (folder / CHECKSUMS).write_text(json.dumps(sums, indent=1, sort_keys=True))


def checkpoint_problem(folder: Path) -> str | None:
    """Why a complete-looking checkpoint cannot be trusted (None: every file is there with its checksum)."""
    if not (folder / CHECKSUMS).is_file():
        return f"has no {CHECKSUMS} (not written by this version, or cut short)"
    expected = json.loads((folder / CHECKSUMS).read_text())
    for name, digest in expected.items():
        path = folder / name
        if not path.is_file():
            return f"lacks {name}"
        if file_digest(path) != digest:
            return f"{name} does not match its checksum (corrupt or truncated)"
    return None


def newest_intact_checkpoint(run_dir: Path) -> tuple[Path | None, list[Path]]:
    """The newest checkpoint whose files match their checksums, after moving every newer one that does not
    aside (`checkpoint-N.stale-<time>`, kept, with a warning naming it); and the ones moved."""
    moved = []
    for checkpoint in reversed(complete_checkpoints(run_dir)):
        problem = checkpoint_problem(checkpoint)
        if problem is None:
            return checkpoint, moved
        moved.append(set_aside(checkpoint, f"{problem}: not resumed from"))
    return None, moved


def trained_state_names(model: torch.nn.Module) -> set[str]:
    """The entries of `model`'s state dict that training changes: parameters that require gradients, and buffers
    (running statistics, as a BatchNorm's)."""
    return ({name for name, p in model.named_parameters() if p.requires_grad}
            | {name for name, _ in model.named_buffers()})


def checkpoint_trained_state(accelerator) -> None:
    """From now on, `accelerator`'s checkpoints hold each model's trained state only (`trained_state_names`), not
    its frozen weights: a partial fine-tune's frozen two thirds of the 3.4 GB U-Net, or the whole U-Net under
    LoRA, would otherwise be written into every checkpoint. The frozen weights come back from where the run loaded
    them (its identity includes their fingerprint); a checkpoint that holds other entries than the model's trained
    ones is refused."""
    accelerator.register_save_state_pre_hook(_keep_trained_state)
    accelerator.register_load_state_pre_hook(_load_trained_state)


def _keep_trained_state(models: list, weights: list, output_dir: str) -> None:
    for index, (model, state) in enumerate(zip(models, weights)):
        kept = trained_state_names(model)
        weights[index] = {name: tensor for name, tensor in state.items() if name in kept}


def _load_trained_state(models: list, input_dir: str) -> None:
    from accelerate.utils import SAFE_MODEL_NAME
    from safetensors.torch import load_file

    for index, model in enumerate(models):
        path = Path(input_dir) / f"{SAFE_MODEL_NAME}{'' if index == 0 else f'_{index}'}.safetensors"
        state = load_file(path)
        expected = trained_state_names(model)
        if state.keys() != expected:
            raise CheckpointError(
                f"{path} holds {len(state)} tensors, not the {len(expected)} this run trains ("
                f"{len(state.keys() - expected)} others, {len(expected - state.keys())} missing): a checkpoint "
                f"of another model or fine-tune mode, or of the whole model as this version no longer writes")
        model.load_state_dict(state, strict=False)
    models.clear()  # loaded here: accelerate loads none of them again


def load_newest_checkpoint(accelerator, run_dir: Path, state) -> int:
    """Load the newest intact checkpoint of `run_dir` (`newest_intact_checkpoint`, chosen by the main process for
    all) into what `accelerator` holds, if there is one; the step to continue from (`state.step`, restored with
    it). Checkpoints that were found but are all corrupt stop the run, naming them."""
    from accelerate.utils import broadcast_object_list

    choice = [newest_intact_checkpoint(run_dir) if accelerator.is_main_process else None]
    if accelerator.num_processes > 1:
        broadcast_object_list(choice)
    checkpoint, moved = choice[0]
    if checkpoint is None and moved:
        raise CheckpointError(f"no intact checkpoint in {run_dir / 'checkpoints'}: "
                              f"{', '.join(str(p) for p in moved)} failed their checksums and were moved aside. "
                              f"Run again to train from step 0, or restore an intact checkpoint there")
    if checkpoint is not None:
        accelerator.load_state(str(checkpoint))
        log.info("resumed from %s at step %d", checkpoint, state.step)
    return state.step


def save_checkpoint(accelerator, run_dir: Path, step: int, keep: int) -> Path:
    """`accelerator`'s state as `run_dir/checkpoints/checkpoint-<step>`, written into a temporary folder with every
    file's checksum and renamed, so a kill never leaves a half checkpoint as the newest and a corrupted one is
    caught on resume; then all but the newest `keep` are removed."""
    final = run_dir / "checkpoints" / f"checkpoint-{step}"
    partial = final.with_name(final.name + ".tmp")
    if accelerator.is_main_process:  # a killed run's leftover; removed before any rank writes into it
        shutil.rmtree(partial, ignore_errors=True)
    accelerator.wait_for_everyone()
    with disk_full_named(partial):
        accelerator.save_state(str(partial))
    accelerator.wait_for_everyone()  # every rank's files are in before the checksums and the rename
    if accelerator.is_main_process:
        with disk_full_named(partial):
            write_checksums(partial)
        if final.exists():  # this step's checkpoint again (a run stopped right after writing it, resumed)
            shutil.rmtree(final)
        partial.rename(final)
        for old in complete_checkpoints(run_dir)[:-keep]:
            shutil.rmtree(old)
    accelerator.wait_for_everyone()
    return final


class StopSignals:
    """Within the block, SIGTERM and SIGUSR1 (Slurm's preemption and its early warning, `--signal`) are noted instead
    of ending the process, so a training loop can finish its step, checkpoint and stop (`requested`). Installed
    only in the main thread (the only place Python delivers signals); the previous handlers come back after."""

    SIGNALS = (signal.SIGTERM, signal.SIGUSR1)

    def __init__(self):
        self.received: int | None = None
        self._previous: dict = {}

    def __enter__(self) -> "StopSignals":
        if threading.current_thread() is threading.main_thread():
            for number in self.SIGNALS:
                self._previous[number] = signal.signal(number, self._note)
        return self

    def __exit__(self, *exc) -> None:
        for number, handler in self._previous.items():
            signal.signal(number, handler)

    def _note(self, number, frame) -> None:
        if self.received is None:
            log.warning("%s received: stopping after this step's checkpoint", signal.Signals(number).name)
        self.received = number

    def requested(self, accelerator) -> bool:
        """Whether any process was signalled (one flag reduced over the processes: they stop at the same step)."""
        flag = float(self.received is not None)
        if accelerator.num_processes > 1:
            flag = float(accelerator.reduce(torch.tensor([flag], device=accelerator.device), reduction="sum")[0])
        return flag > 0

    def stop(self, step: int, checkpoint: Path) -> Preempted:
        name = signal.Signals(self.received).name if self.received else "a signal to another process"
        return Preempted(f"stopped by {name} after step {step}, with {checkpoint} written: run again to resume "
                         f"from it")

    def after_step(self, accelerator, step: int, due: bool, save_checkpoint) -> None:
        """End of a training step: `save_checkpoint()` when one is `due` or a stop was requested, then stop
        (`Preempted`, a non-zero exit: Slurm's requeue or the profile's retries resume from that checkpoint)."""
        preempted = self.requested(accelerator)
        if due or preempted:
            checkpoint = save_checkpoint()
        if preempted:
            raise self.stop(step, checkpoint)
