"""A training run's state folder (urepa.runstate): named by the run's identity, claimed with its run.json, and
its complete checkpoints; the training code that is part of the identity."""
import json
import logging
from pathlib import Path

import urepa
from urepa.runstate import TRAINING_CODE, claim_run_state, complete_checkpoints, run_state_dir, training_code_digest


def test_a_run_state_is_named_by_its_identity_whatever_the_key_order(tmp_path):
    identity = {"settings": {"lr": 1e-4, "align_coeff": 0.8}, "seed": 0}
    reordered = {"seed": 0, "settings": {"align_coeff": 0.8, "lr": 1e-4}}
    assert run_state_dir(tmp_path, identity) == run_state_dir(tmp_path, reordered)
    assert run_state_dir(tmp_path, identity) != run_state_dir(tmp_path, {**identity, "seed": 1})
    assert run_state_dir(tmp_path, identity).parent == tmp_path


def test_a_state_folder_recording_another_identity_is_set_aside(tmp_path, caplog):
    identity, launch = {"settings": {"align_coeff": 0.8}, "seed": 0}, {"processes": 1}
    squatter = run_state_dir(tmp_path, identity)
    (squatter / "checkpoints" / "checkpoint-4").mkdir(parents=True)
    (squatter / "run.json").write_text(json.dumps({"settings": {"align_coeff": 0.5}, "seed": 0, "launches": [{}]}))
    with caplog.at_level(logging.WARNING):
        claimed = claim_run_state(tmp_path, identity, launch)
    assert claimed == squatter and f"{squatter} records another identity than its name says" in caplog.text
    (stale,) = tmp_path.glob(f"{squatter.name}.stale-*")
    assert (stale / "checkpoints" / "checkpoint-4").is_dir()  # kept, not deleted
    recorded = json.loads((claimed / "run.json").read_text())
    assert recorded == {**identity, "launches": [{"processes": 1, "from_step": 0}]}


def test_complete_checkpoints_are_ordered_by_step_and_skip_half_written_ones(tmp_path):
    for name in ("checkpoint-10", "checkpoint-9", "checkpoint-100.tmp", "checkpoint-2", "other-3"):
        (tmp_path / "checkpoints" / name).mkdir(parents=True)
    assert [p.name for p in complete_checkpoints(tmp_path)] == ["checkpoint-2", "checkpoint-9", "checkpoint-10"]
    assert complete_checkpoints(tmp_path / "none") == []


def test_the_training_code_is_the_packages_own_modules_and_its_digest_follows_them(tmp_path, monkeypatch):
    """Every module named in TRAINING_CODE exists (a renamed module would otherwise fail every run), and the
    digest is of their contents: a change to any of them changes it."""
    package = Path(urepa.__file__).parent
    assert all((package / name).is_file() for name in TRAINING_CODE)
    assert {"losses.py", "models.py", "train.py", "batches.py"} <= set(TRAINING_CODE)
    digest = training_code_digest()
    assert digest == training_code_digest() and len(digest) == 16
    import urepa.runstate as runstate

    for name in TRAINING_CODE:
        (tmp_path / name).write_bytes((package / name).read_bytes())
    monkeypatch.setattr(runstate, "__file__", str(tmp_path / "runstate.py"))
    assert training_code_digest() == digest
    (tmp_path / TRAINING_CODE[-1]).write_bytes((package / TRAINING_CODE[-1]).read_bytes() + b"\n")
    assert training_code_digest() != digest
