"""Deterministic global batches: which rows each step trains on (a pure function of seed and step), the
checkpointed generator every other draw comes from, how a step's global batch is split over processes and
accumulated micro-batches, and the gather that puts a micro-batch's pooled tokens back among the whole batch's
for the sample-mode manifold Gram.

Light on purpose (torch only): the gloo tests spawn processes that import it."""
from __future__ import annotations

import numpy as np
import torch
from torch.distributed.nn.functional import all_gather
from torch.utils.data import Sampler


def process_share(batch_size: int, rank: int, world_size: int, grad_accum: int) -> np.ndarray:
    """Positions in the global batch of process `rank`'s rows, micro-batch after micro-batch.

    The global batch is cut into grad_accum x world_size equal parts, micro-batch-major: micro-batch m of
    process r is part m * world_size + r, so a micro-batch gathered across processes is one contiguous block."""
    parts = world_size * grad_accum
    if batch_size % parts:
        raise ValueError(
            f"train.batch_size {batch_size} does not divide by train.processes x train.grad_accum = {world_size} x "
            f"{grad_accum} = {parts}: every process takes an equal share of every micro-batch. Use a batch_size "
            f"that is a multiple of {parts}.")
    part = batch_size // parts
    return np.concatenate([np.arange(p * part, (p + 1) * part)
                           for p in range(rank, parts, world_size)])


class GlobalBatch:
    """`gather` of urepa.losses.manifold_loss: one micro-batch's pooled rows placed among the rows of the
    whole global batch, so that the sample-mode Gram is the global batch's.

    The micro-batch's rows of every process are all-gathered with their gradient: every process computes the
    same global loss, the gather's backward sums the processes' gradients for each process's own rows (N times
    its share) and DDP's mean over the N processes leaves the one-process gradient. With grad_accum > 1 the
    rows of the other micro-batches are constants from a forward pass without gradient (`known`: per layer,
    the global batch's pooled pred and target rows): each micro-batch's backward carries its own rows' part of
    the global Gram's gradient, and the parts add up over the accumulation."""

    def __init__(self, micro: int, num_processes: int, known: dict[str, tuple[torch.Tensor, torch.Tensor]] | None):
        self.micro, self.num_processes, self.known = micro, num_processes, known

    def __call__(self, layer: str, pred: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.num_processes > 1:
            pred = torch.cat(all_gather(pred))
        if self.known is None:
            return pred, torch.cat(all_gather(target)) if self.num_processes > 1 else target
        known_pred, known_target = self.known[layer]
        start, stop = self.micro * len(pred), (self.micro + 1) * len(pred)
        return torch.cat([known_pred[:start], pred, known_pred[stop:]]), known_target


class StepBatches(Sampler):
    """Row indices of every step from `start_step` on: epoch e is a permutation seeded by (seed, e),
    cut into full global batches; each process takes its own share of each (`process_share`)."""

    def __init__(self, rows: np.ndarray, batch_size: int, seed: int, start_step: int = 0, rank: int = 0,
                 world_size: int = 1, grad_accum: int = 1):
        if len(rows) < batch_size:
            raise ValueError(f"only {len(rows)} valid cached rows for a batch of {batch_size}")
        self.rows, self.batch_size, self.seed, self.start_step = rows, batch_size, seed, start_step
        self.share = process_share(batch_size, rank, world_size, grad_accum)
        self.batches_per_epoch = len(rows) // batch_size

    def __iter__(self):
        step = self.start_step
        while True:
            epoch, position = divmod(step, self.batches_per_epoch)
            order = np.random.default_rng([self.seed, epoch]).permutation(self.rows)
            batch = order[position * self.batch_size:(position + 1) * self.batch_size]
            yield batch[self.share]
            step += 1


class TrainState:
    """The step and the generator of every random draw, saved with each checkpoint."""

    def __init__(self, generator: torch.Generator):
        self.step, self.generator = 0, generator

    def state_dict(self) -> dict:
        return {"step": self.step, "generator": self.generator.get_state()}

    def load_state_dict(self, state: dict) -> None:
        self.step = int(state["step"])
        self.generator.set_state(state["generator"])
