"""A training run's state folder: its identity (settings, seed, data with the caches' contents, training code), the
folder named by that identity with its run.json, and the complete checkpoints in it. Snakemake does not see
inside a run; this is what lets a killed, requeued or repeated run find its own state and nobody else's."""
from __future__ import annotations

import hashlib
import json
import logging
import shutil
from pathlib import Path

from .runtime import set_aside

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
    """A run state's complete checkpoints, oldest first (a half-written one is named *.tmp)."""
    return sorted((run_dir / "checkpoints").glob("checkpoint-*[0-9]"), key=lambda p: int(p.name.split("-")[1]))


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


def load_newest_checkpoint(accelerator, run_dir: Path, state) -> int:
    """Load the newest complete checkpoint of `run_dir` into what `accelerator` holds, if there is one; the step to
    continue from (`state.step`, restored with it)."""
    found = complete_checkpoints(run_dir)
    if found:
        accelerator.load_state(str(found[-1]))
        log.info("resumed from %s at step %d", found[-1], state.step)
    return state.step


def save_checkpoint(accelerator, run_dir: Path, step: int, keep: int) -> Path:
    """`accelerator`'s state as `run_dir/checkpoints/checkpoint-<step>`, written into a temporary folder and renamed,
    so a kill never leaves a half checkpoint as the newest; then all but the newest `keep` are removed."""
    final = run_dir / "checkpoints" / f"checkpoint-{step}"
    partial = final.with_name(final.name + ".tmp")
    if accelerator.is_main_process:  # a killed run's leftover; removed before any rank writes into it
        shutil.rmtree(partial, ignore_errors=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(partial))
    accelerator.wait_for_everyone()  # every rank's files are in before the folder is renamed
    if accelerator.is_main_process:
        partial.rename(final)
        for old in complete_checkpoints(run_dir)[:-keep]:
            shutil.rmtree(old)
    return final
