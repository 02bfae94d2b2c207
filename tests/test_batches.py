"""The batches of a training step (urepa.batches): the step sampler, a pure function of seed and step, and the
split of a step's global batch over processes and micro-batches: the sample-mode manifold term of a batch split
over two gloo ranks (torch.multiprocessing) or two accumulated micro-batches equals the one-process value on the
whole batch, gradient included; parts are micro-batch-major.

Light imports (torch and two urepa modules, no conftest): the spawned ranks import this module."""
from __future__ import annotations

import itertools
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from urepa.batches import GlobalBatch, StepBatches, process_share
from urepa.losses import alignment_loss, manifold_loss, pooled_samples


BATCH, TOKENS, IN_DIM, DIM, MANIFOLD_COEFF = 8, 4, 6, 5, 3.0


GRAM_OPTIONS = [{}, {"upper_only": True, "mask_diag": True}]


STEP_BATCH = 4  # rows per step of the step sampler's tests


def _tokens():
    """A batch of U-Net-side tokens made by a shared weight (the parameter whose gradient is compared) and
    L2-normalised DINOv2-side targets."""
    generator = torch.Generator().manual_seed(0)
    inputs = torch.randn(BATCH, TOKENS, IN_DIM, generator=generator)
    target = F.normalize(torch.randn(BATCH, TOKENS, DIM, generator=generator), dim=-1)
    weight = torch.randn(IN_DIM, DIM, generator=generator)
    return inputs, target, weight


def _losses(inputs, target, weight, gather, options) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """(value, gradient wrt the weight) of the manifold term and of the whole alignment loss."""
    results = {}
    for name in ("manifold", "alignment"):
        leaf = weight.clone().requires_grad_()
        pred = inputs @ leaf
        if name == "manifold":
            value = manifold_loss(pred, target, "sample", gather=gather and (lambda p, t: gather("mid", p, t)),
                                  **options)
        else:
            value = alignment_loss({"mid": pred}, target, MANIFOLD_COEFF, "sample", gather=gather, **options)[0]
        value.backward()
        results[name] = (value.detach(), leaf.grad)
    return results


def _rank(rank: int, world: int, store: str, out: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    inputs, target, weight = _tokens()
    rows = slice(rank * BATCH // world, (rank + 1) * BATCH // world)
    results = []
    for options in GRAM_OPTIONS:
        losses = _losses(inputs[rows], target[rows], weight, GlobalBatch(0, world, None), options)
        for value, grad in losses.values():
            dist.all_reduce(grad)  # what DDP does with every process's gradient: the mean
            grad /= world
        results.append(losses)
    torch.save(results, Path(out) / f"rank{rank}.pt")
    dist.destroy_process_group()


def test_manifold_term_of_a_two_rank_batch_equals_the_one_rank_value_and_gradient(tmp_path):
    mp.spawn(_rank, args=(2, str(tmp_path / "store"), str(tmp_path)), nprocs=2)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    inputs, target, weight = _tokens()
    for i, options in enumerate(GRAM_OPTIONS):
        whole = _losses(inputs, target, weight, None, options)
        # The Gram over the gathered batch: every rank holds the whole batch's manifold value.
        for rank in ranks:
            torch.testing.assert_close(rank[i]["manifold"][0], whole["manifold"][0], rtol=1e-6, atol=0)
        # The token term is each rank's own mean: their mean is the whole batch's alignment loss.
        torch.testing.assert_close((ranks[0][i]["alignment"][0] + ranks[1][i]["alignment"][0]) / 2,
                                   whole["alignment"][0], rtol=1e-6, atol=0)
        # After DDP's mean over ranks, the gradient of the one-rank run on the concatenated batch.
        for name in ("manifold", "alignment"):
            for rank in ranks:
                torch.testing.assert_close(rank[i][name][1], whole[name][1], rtol=1e-5, atol=1e-7,
                                           msg=lambda m: f"{name} gradient, {options}: {m}")


def test_accumulated_micro_batches_carry_the_whole_batch_gram_gradient():
    """Two micro-batches, each with the other's pooled rows as constants (the trainer's no-grad pass): each
    holds the whole batch's manifold value, and their gradients add up to the whole batch's."""
    inputs, target, weight = _tokens()
    with torch.no_grad():
        known = {"mid": (pooled_samples(inputs @ weight), pooled_samples(target))}
    whole = _losses(inputs, target, weight, None, {})["manifold"]
    grads = []
    for micro in range(2):
        rows = slice(micro * BATCH // 2, (micro + 1) * BATCH // 2)
        value, grad = _losses(inputs[rows], target[rows], weight, GlobalBatch(micro, 1, known), {})["manifold"]
        torch.testing.assert_close(value, whole[0], rtol=1e-6, atol=0)
        grads.append(grad)
    torch.testing.assert_close(grads[0] + grads[1], whole[1], rtol=1e-5, atol=1e-7)
    assert not torch.allclose(grads[0], whole[1], rtol=0.1)  # each micro-batch alone carries only its part


def test_parts_are_micro_batch_major_and_must_split_evenly():
    """Micro-batch m of process r is part m * processes + r of the global batch."""
    assert process_share(8, 0, 2, 2).tolist() == [0, 1, 4, 5]
    assert process_share(8, 1, 2, 2).tolist() == [2, 3, 6, 7]
    assert process_share(8, 1, 2, 1).tolist() == [4, 5, 6, 7]
    assert np.array_equal(np.sort(np.concatenate([process_share(12, r, 3, 2) for r in range(3)])), np.arange(12))
    with pytest.raises(ValueError, match=r"train.batch_size 6 does not divide by train.processes x "
                                         r"train.grad_accum = 2 x 2 = 4: every process takes an equal share"):
        process_share(6, 0, 2, 2)


# -- the step sampler ----------------------------------------------------------------------------------


def take_batches(sampler: StepBatches, n: int) -> list[np.ndarray]:
    return list(itertools.islice(iter(sampler), n))


def test_step_batches_are_a_pure_function_of_seed_and_step():
    rows = np.setdiff1d(np.arange(30), [3, 17])  # 28 rows: 7 batches of 4 per epoch
    run = take_batches(StepBatches(rows, STEP_BATCH, seed=5), 30)
    again = take_batches(StepBatches(rows, STEP_BATCH, seed=5), 30)
    assert all(np.array_equal(a, b) for a, b in zip(run, again))
    other_seed = take_batches(StepBatches(rows, STEP_BATCH, seed=6), 30)
    assert not all(np.array_equal(a, b) for a, b in zip(run, other_seed))
    for start in (1, 6, 7, 13, 20):  # inside and across epoch boundaries
        resumed = take_batches(StepBatches(rows, STEP_BATCH, seed=5, start_step=start), 30 - start)
        assert all(np.array_equal(a, b) for a, b in zip(resumed, run[start:]))
    for batch in run:
        assert len(batch) == STEP_BATCH and len(set(batch.tolist())) == STEP_BATCH and np.isin(batch, rows).all()
    # an epoch visits every valid row at most once, and successive epochs are shuffled differently
    epoch0, epoch1 = np.concatenate(run[:7]), np.concatenate(run[7:14])
    assert sorted(epoch0.tolist()) == sorted(rows.tolist()) == sorted(epoch1.tolist())
    assert not np.array_equal(epoch0, epoch1)
    # two processes split each global batch between them
    halves = [take_batches(StepBatches(rows, STEP_BATCH, seed=5, rank=r, world_size=2), 10) for r in (0, 1)]
    for step in range(10):
        assert np.array_equal(np.concatenate([halves[0][step], halves[1][step]]), run[step])
    with pytest.raises(ValueError, match="only 3 valid cached rows for a batch of 4"):
        StepBatches(rows[:3], STEP_BATCH, seed=5)
    exactly_one_batch = take_batches(StepBatches(rows[:STEP_BATCH], STEP_BATCH, seed=5), 2)  # an epoch of one batch
    assert all(sorted(batch.tolist()) == rows[:STEP_BATCH].tolist() for batch in exactly_one_batch)


def test_each_process_reads_its_micro_batches_of_the_global_batch():
    """StepBatches hands process r the parts m * processes + r of the one-process batch, in micro-batch order."""
    rows = np.arange(40)
    whole = next(iter(StepBatches(rows, 8, seed=3)))
    parts = whole.reshape(4, 2)  # 2 processes x 2 micro-batches of 2 rows
    for rank in (0, 1):
        share = next(iter(StepBatches(rows, 8, seed=3, rank=rank, world_size=2, grad_accum=2)))
        assert share.tolist() == [*parts[rank], *parts[2 + rank]]
