"""Fixed-shape physical batches: every logical (Poisson) batch as batches of exactly P rows, with a mask.

A logical batch of n rows becomes ceil(n / P) physical batches (one if n = 0); the last is filled up with padding
rows of zeros, marked False in the mask. Every physical batch thus has one shape, which is what lets a step be
replayed (CUDA graphs) and keeps the host out of it; the number of physical batches still follows the Poisson draw,
so sampling and accounting stay exactly Poisson. The optimizer is told to skip its step after every physical batch
but a logical batch's last (Opacus' BatchMemoryManager does the same with variable shapes).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Any

import torch
from torch.utils._pytree import tree_flatten, tree_map

from ..errors import UserError


def batch_rows(batch: Any) -> int:
    """Rows of a collated batch: the first dimension its tensors share."""
    rows = {t.shape[0] for t in tree_flatten(batch)[0] if isinstance(t, torch.Tensor)}
    if len(rows) != 1:
        raise UserError(f"A batch's tensors must share their first (batch) dimension; got sizes {sorted(rows)}.")
    return rows.pop()


def pad_rows(batch: Any, start: int, size: int) -> tuple[Any, torch.Tensor]:
    """Rows start..start+size of every tensor of `batch`, zero-padded to `size` rows; and the (size,) mask."""
    rows = batch_rows(batch)
    real = max(0, min(size, rows - start))

    def take(t: Any) -> Any:
        if not isinstance(t, torch.Tensor):
            return t
        part = t[start : start + real]
        if real == size:
            return part
        return torch.cat([part, part.new_zeros(size - real, *t.shape[1:])])

    mask = torch.arange(size) < real
    return tree_map(take, batch), mask


class PhysicalBatchLoader:
    """Iterates `(batch, mask)` physical batches of exactly `size` rows over a loader of logical batches."""

    def __init__(self, data_loader, size: int, optimizer):
        self.data_loader, self.size, self.optimizer = data_loader, size, optimizer
        self.dataset = data_loader.dataset
        self.batch_sampler = getattr(data_loader, "batch_sampler", None)

    def __len__(self) -> int:
        """Logical batches per epoch (their physical count depends on the draw)."""
        return len(self.data_loader)

    def __iter__(self) -> Iterator[tuple[Any, torch.Tensor]]:
        """Our DP optimizer (not Opacus'): a physical batch not followed by `optimizer.step()` is refused (its sums
        would join another step than their logical batch's), and a logical batch left early (`break`, or an iterator
        dropped) is dropped."""
        checked = hasattr(self.optimizer, "abandon_logical_batch")
        if checked:  # an earlier iterator may still be open inside a logical batch
            self.optimizer.abandon_logical_batch()
        for batch in self.data_loader:
            count = max(1, math.ceil(batch_rows(batch) / self.size))
            for index in range(count):
                self.optimizer.signal_skip_step(do_skip=index < count - 1)
                steps = self.optimizer.steps_called if checked else 0
                try:
                    yield pad_rows(batch, index * self.size, self.size)
                except GeneratorExit:
                    if checked:
                        self.optimizer.abandon_logical_batch()
                    raise
                if checked and self.optimizer.steps_called == steps:
                    raise UserError(
                        "Call optimizer.step() (then optimizer.zero_grad()) after every physical batch: it steps "
                        "only after a logical batch's last one. Without it, several logical batches would be "
                        "noised and accounted as one step, and the privacy guarantee would not hold."
                    )
