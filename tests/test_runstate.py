"""A training run's state folder (urepa.runstate): named by the run's identity, claimed with its run.json, and
its complete checkpoints, verified on resume; the training code that is part of the identity; stop signals."""
import json
import logging
import os
import signal
from pathlib import Path

import pytest
import torch

import urepa
from urepa.batches import TrainState
from safetensors.torch import load_file

from urepa.runstate import (CHECKSUMS, TRAINING_CODE, CheckpointError, StopSignals, checkpoint_trained_state,
                            claim_run_state, complete_checkpoints, load_newest_checkpoint, run_state_dir,
                            save_checkpoint, training_code_digest)


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
    for name in ("checkpoint-10", "checkpoint-9", "checkpoint-100.tmp", "checkpoint-2", "other-3",
                 "checkpoint-11.stale-20261207-143700"):
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


class TinyRun:
    """A model, its optimiser and the step state in an Accelerator, as a training run holds them: a frozen layer
    (the base weights, seeded alike in every run), a trained one and a BatchNorm (trained, with running statistics)."""

    def __init__(self, run_dir: Path):
        from accelerate import Accelerator

        self.run_dir = run_dir
        self.accelerator = Accelerator(cpu=True)
        self.model = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.Linear(64, 64), torch.nn.BatchNorm1d(64))
        base = torch.Generator().manual_seed(0)
        with torch.no_grad():
            for parameter in self.model[0].parameters():
                parameter.copy_(torch.randn(parameter.shape, generator=base))
        self.model[0].requires_grad_(False)
        self.optimizer = torch.optim.AdamW([p for p in self.model.parameters() if p.requires_grad])
        self.state = TrainState(torch.Generator().manual_seed(0))
        self.model, self.optimizer = self.accelerator.prepare(self.model, self.optimizer)
        self.accelerator.register_for_checkpointing(self.state)
        checkpoint_trained_state(self.accelerator)

    def train_to(self, step: int) -> None:
        """Steps up to `step`, checkpointing each (keeping 3)."""
        while self.state.step < step:
            self.model(torch.randn(4, 64, generator=self.state.generator)).square().mean().backward()
            self.optimizer.step()
            self.optimizer.zero_grad()
            self.state.step += 1
            save_checkpoint(self.accelerator, self.run_dir, self.state.step, keep=3)


def flip_bytes(path: Path, count: int = 32) -> None:
    data = bytearray(path.read_bytes())
    middle = len(data) - 200  # inside the last tensor's data, past the safetensors header
    data[middle:middle + count] = bytes(b ^ 0xFF for b in data[middle:middle + count])
    path.write_bytes(bytes(data))


def test_a_checkpoint_holds_the_trained_state_only_and_resumes_it_into_the_frozen_base(tmp_path):
    """model.safetensors: the trained layer and the BatchNorm's weights and running statistics, not the frozen
    layer; a new run with the same base resumes with every tensor of the model equal to the saved run's."""
    run = TinyRun(tmp_path)
    run.train_to(2)
    saved = load_file(tmp_path / "checkpoints" / "checkpoint-2" / "model.safetensors")
    assert sorted(saved) == ["1.bias", "1.weight", "2.bias", "2.num_batches_tracked", "2.running_mean",
                             "2.running_var", "2.weight"]
    assert int(saved["2.num_batches_tracked"]) == 2 and not torch.equal(saved["2.running_mean"], torch.zeros(64))

    resumed = TinyRun(tmp_path)
    trained_before = {k: v.clone() for k, v in resumed.model.state_dict().items()}
    assert load_newest_checkpoint(resumed.accelerator, tmp_path, resumed.state) == 2
    state = resumed.model.state_dict()
    for name, tensor in run.model.state_dict().items():
        assert torch.equal(state[name], tensor), name
    assert not torch.equal(trained_before["1.weight"], state["1.weight"])  # loaded, not just equal from the start
    assert torch.equal(resumed.optimizer.state_dict()["state"][0]["exp_avg"],
                       run.optimizer.state_dict()["state"][0]["exp_avg"])


def test_a_checkpoint_that_holds_other_tensors_than_the_trained_ones_is_refused(tmp_path):
    from safetensors.torch import save_file

    run = TinyRun(tmp_path)
    run.train_to(1)
    model_file = tmp_path / "checkpoints" / "checkpoint-1" / "model.safetensors"
    whole = {k: v.contiguous() for k, v in run.model.state_dict().items()}  # as accelerate alone would write it
    save_file(whole, model_file)
    resumed = TinyRun(tmp_path)
    with pytest.raises(CheckpointError, match=r"holds 9 tensors, not the 7 this run trains \(2 others, 0 missing\)"):
        resumed.accelerator.load_state(str(model_file.parent))


@pytest.mark.parametrize("damage", ["flipped", "truncated", "no checksums"])
def test_a_damaged_newest_checkpoint_is_set_aside_and_the_run_resumes_from_the_newest_intact_one(damage, tmp_path,
                                                                                                  caplog):
    run = TinyRun(tmp_path)
    run.train_to(3)
    optimizer_at_2 = torch.load(tmp_path / "checkpoints" / "checkpoint-2" / "optimizer.bin", weights_only=False)
    newest = tmp_path / "checkpoints" / "checkpoint-3"
    assert (newest / CHECKSUMS).is_file()
    if damage == "flipped":
        flip_bytes(newest / "model.safetensors")
    elif damage == "truncated":
        (newest / "model.safetensors").write_bytes((newest / "model.safetensors").read_bytes()[:100])
    else:
        (newest / CHECKSUMS).unlink()
    resumed = TinyRun(tmp_path)
    with caplog.at_level(logging.WARNING):
        assert load_newest_checkpoint(resumed.accelerator, tmp_path, resumed.state) == 2
    assert "checkpoint-3" in caplog.text and "not resumed from" in caplog.text
    (aside,) = (tmp_path / "checkpoints").glob("checkpoint-3.stale-*")  # kept for inspection, never deleted
    assert (aside / "model.safetensors").is_file()
    assert [p.name for p in complete_checkpoints(tmp_path)] == ["checkpoint-1", "checkpoint-2"]
    assert torch.equal(resumed.optimizer.state_dict()["state"][0]["exp_avg"], optimizer_at_2["state"][0]["exp_avg"])


def test_a_run_whose_checkpoints_are_all_corrupt_stops_naming_them(tmp_path):
    run = TinyRun(tmp_path)
    run.train_to(2)
    for step in (1, 2):
        flip_bytes(tmp_path / "checkpoints" / f"checkpoint-{step}" / "model.safetensors")
    resumed = TinyRun(tmp_path)
    with pytest.raises(CheckpointError, match=r"no intact checkpoint .*checkpoint-2\.stale-.*checkpoint-1\.stale-"):
        load_newest_checkpoint(resumed.accelerator, tmp_path, resumed.state)
    assert complete_checkpoints(tmp_path) == []
    assert load_newest_checkpoint(resumed.accelerator, tmp_path, resumed.state) == 0  # run again: from step 0


@pytest.mark.parametrize("number", [signal.SIGTERM, signal.SIGUSR1])
def test_a_stop_signal_is_noted_not_obeyed_within_the_block_and_obeyed_again_after(number):
    from accelerate import Accelerator

    accelerator = Accelerator(cpu=True)
    previous = signal.getsignal(number)
    with StopSignals() as stop:
        assert not stop.requested(accelerator)
        os.kill(os.getpid(), number)  # the process goes on
        assert stop.requested(accelerator)
        assert f"stopped by {signal.Signals(number).name} after step 7" in str(stop.stop(7, Path("checkpoint-7")))
    assert signal.getsignal(number) == previous  # the previous handler is back
