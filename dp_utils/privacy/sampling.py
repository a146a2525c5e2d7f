"""Poisson sampling that keeps ranks in lock-step and resumes at any step.

DP-SGD's accounting assumes that at every step each row joins the batch independently with probability q.
Opacus' distributed sampler draws that, but skips a rank's empty local batch, so ranks can disagree on the number
of steps and hang in the gradient all-reduce. Here the mask of a step is a function of (seed, step) alone:

    mask_s = U_s < q,   U_s ~ Uniform[0, 1)^N from a generator whose whole state is expanded from (seed, s)
    rank r yields {i : mask_s[i], i = r mod W} for every step s, empty or not

so the union over ranks is the global draw whatever the world size W, and a run restarted at step k draws
exactly what an uninterrupted run draws from step k on. The amplification by subsampling holds only while the
batches stay secret: the seed is a 128-bit secret (`dp_utils.privacy.randomness`), checkpointed, never published.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import torch
from torch.utils.data import DataLoader, IterableDataset, Sampler

from ..errors import UserError
from .randomness import generator_from_entropy


class PoissonBatchSampler(Sampler[list[int]]):
    """Every step, each row of the dataset independently with probability `sample_rate`; this rank's share of it.

    Rank `rank` of `world_size` owns the rows `range(rank, num_samples, world_size)` and yields one batch per step,
    `[]` included, so every rank takes the same number of steps. Steps are numbered globally: a pass over the
    sampler draws the next `steps` of them, up to the end of the current epoch (pass e draws steps
    [e * steps, (e + 1) * steps)), so a new epoch never repeats an earlier draw. `start_step` or `set_step(k)`
    resumes at global step k.
    """

    def __init__(
        self,
        num_samples: int,
        sample_rate: float,
        steps: int,
        seed: int,
        rank: int = 0,
        world_size: int = 1,
        start_step: int = 0,
    ):
        if num_samples <= 0:
            raise UserError(f"num_samples must be positive, got {num_samples}.")
        if not 0 < sample_rate <= 1:
            raise UserError(f"sample_rate must be in (0, 1], got {sample_rate}.")
        if steps <= 0:
            raise UserError(f"steps (per epoch) must be positive, got {steps}.")
        if not 0 <= rank < world_size:
            raise UserError(f"rank must be in [0, world_size={world_size}), got {rank}.")
        self.num_samples = num_samples
        self.sample_rate = sample_rate
        self.steps = steps
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.set_step(start_step)

    def set_step(self, step: int) -> None:
        """Make the next pass start at global step `step` (to resume a run where it stopped)."""
        if step < 0:
            raise UserError(f"step must be non-negative, got {step}.")
        self.next_step = step

    def indices_at(self, step: int) -> list[int]:
        """This rank's rows in the Poisson batch of global step `step`."""
        generator = generator_from_entropy([self.seed, step])  # nearby (seed, step) pairs: unrelated streams
        # float64 so that a row's inclusion probability is q itself, not q rounded to float32's 2^-24 grid
        mask = torch.rand(self.num_samples, generator=generator, dtype=torch.float64) < self.sample_rate
        local = mask[self.rank :: self.world_size].nonzero().flatten()
        return (local * self.world_size + self.rank).tolist()

    def __iter__(self) -> Iterator[list[int]]:
        # Runs at the first next(), not at iter(): DataLoader's worker iterator calls iter() twice when it starts.
        begin = self.next_step
        end = (begin // self.steps + 1) * self.steps
        self.next_step = end  # set before yielding: a pass cut short is not drawn again by the next one
        for step in range(begin, end):
            yield self.indices_at(step)

    def __len__(self) -> int:
        return self.steps - self.next_step % self.steps


def _zero_rows(batch: Any) -> Any:
    """`batch` with every tensor cut to zero rows (batch first); the structure stays, no value of the sample does."""
    if isinstance(batch, torch.Tensor):
        return batch.new_empty((0, *batch.shape[1:]))
    if isinstance(batch, Mapping):
        return {key: _zero_rows(value) for key, value in batch.items()}
    if isinstance(batch, tuple) and hasattr(batch, "_fields"):  # a namedtuple takes its fields as arguments
        return type(batch)(*(_zero_rows(value) for value in batch))
    if isinstance(batch, (list, tuple)):
        return type(batch)(_zero_rows(value) for value in batch)
    raise TypeError(
        f"No empty form for a batch holding {type(batch).__name__}: the collate function must return tensors, "
        "possibly in dicts, lists or tuples, so that an empty Poisson batch carries no data."
    )


class EmptyBatchCollate:
    """`collate_fn`, except that an empty index list gives zero-row tensors shaped like a collated `sample`."""

    def __init__(self, collate_fn: Callable[[list[Any]], Any], sample: Any):
        self.collate_fn = collate_fn
        self.empty_batch = _zero_rows(collate_fn([sample]))

    def __call__(self, samples: list[Any]) -> Any:
        if samples:
            return self.collate_fn(samples)
        return copy.deepcopy(self.empty_batch)  # a fresh structure: callers may edit the dict or list they get


def poisson_data_loader(
    data_loader: DataLoader,
    seed: int,
    steps: int | None = None,
    distributed: bool = False,
    sample_rate: float | None = None,
) -> DataLoader:
    """`data_loader`'s dataset and loading options with Poisson batches at rate q = `sample_rate`, by default
    Opacus' rate 1 / len(data_loader).

    `steps` per epoch defaults to len(data_loader). With `distributed=True` this rank draws its share of each
    batch (rank and world size from torch.distributed); every rank must pass the same `seed`.
    """
    dataset = data_loader.dataset
    if isinstance(dataset, IterableDataset):
        raise UserError("Poisson sampling needs a map-style dataset (rows by index), not an IterableDataset.")
    rank, world_size = (torch.distributed.get_rank(), torch.distributed.get_world_size()) if distributed else (0, 1)
    batch_sampler = PoissonBatchSampler(
        num_samples=len(dataset),
        sample_rate=1 / len(data_loader) if sample_rate is None else sample_rate,
        steps=len(data_loader) if steps is None else steps,
        seed=seed,
        rank=rank,
        world_size=world_size,
    )
    with torch.random.fork_rng(devices=[]):  # a dataset may draw from torch's RNG: the probe must not shift it
        sample = dataset[0]
    return DataLoader(
        dataset,
        batch_sampler=batch_sampler,
        collate_fn=EmptyBatchCollate(data_loader.collate_fn, sample),
        generator=data_loader.generator,
        **loading_options(data_loader),
    )


def loading_options(data_loader: DataLoader) -> dict[str, Any]:
    """How `data_loader` loads (workers, pinning, ...): kept by a loader that samples its batches differently."""
    return dict(
        num_workers=data_loader.num_workers,
        pin_memory=data_loader.pin_memory,
        timeout=data_loader.timeout,
        worker_init_fn=data_loader.worker_init_fn,
        multiprocessing_context=data_loader.multiprocessing_context,
        prefetch_factor=data_loader.prefetch_factor,
        persistent_workers=data_loader.persistent_workers,
        in_order=data_loader.in_order,
    )
