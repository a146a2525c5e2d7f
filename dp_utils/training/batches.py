"""The physical batches of each step's Poisson batch, built by DataLoader workers.

A step's local batch (this rank's share, `PoissonBatchSampler`) is cut into physical batches of at most
`max_physical_batch_size` images; an empty local batch is one physical batch with no image, so that every rank still
steps (noise, all-reduce and accounting stay in step). Padded to `padded_size` rows, every physical batch has one
shape: the drawn images, then padding rows (zero latents, the null label) marked False in its mask, which the
criterion and the engine turn into exact zeros.

A physical batch's random draws (which view of an image, its latent sample, label dropout) come from a generator
seeded by (seed, rank, step, index), so they do not depend on the number of workers, on their order, or on a resume:
a resumed run builds exactly the physical batches an uninterrupted one does.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import torch
from torch.utils.data import DataLoader, Dataset

from ..data.latent_cache import LatentDataset
from .model import drop_labels


@dataclass(frozen=True)
class PhysicalBatchKey:
    step: int
    index: int  # the physical batch's position in its step's local batch
    rows: tuple[int, ...]
    last: bool  # the last physical batch of the step: the optimizer steps after it


@dataclass
class PhysicalBatch:
    step: int
    last: bool
    latents: torch.Tensor  # (P, C, H, W)
    labels: torch.Tensor  # (P,), dropped labels already replaced by the null label
    mask: torch.Tensor  # (P,) bool: True for a drawn image, False for a padding row

    def pin_memory(self) -> PhysicalBatch:  # what DataLoader(pin_memory=True) calls on a custom batch type
        return PhysicalBatch(
            self.step, self.last, self.latents.pin_memory(), self.labels.pin_memory(), self.mask.pin_memory()
        )


def physical_batch_keys(batches: Iterable[list[int]], start_step: int, size: int) -> Iterator[PhysicalBatchKey]:
    """The physical batches of each step's local batch, steps numbered from `start_step`."""
    for step, rows in enumerate(batches, start_step):
        starts = range(0, len(rows), size) or [0]
        for index, start in enumerate(starts):
            yield PhysicalBatchKey(step, index, tuple(rows[start : start + size]), last=start + size >= len(rows))


class PhysicalBatchDataset(Dataset):
    """Maps a PhysicalBatchKey to its PhysicalBatch: the rows' latent samples and labels, drawn from its own
    generator; padded to `padded_size` rows when given."""

    def __init__(
        self,
        dataset: LatentDataset,
        class_dropout_prob: float,
        null_label: int,
        seed: int,
        rank: int,
        padded_size: int | None = None,
    ):
        self.dataset, self.class_dropout_prob, self.null_label = dataset, class_dropout_prob, null_label
        self.seed, self.rank, self.padded_size = seed, rank, padded_size

    def _seed(self, key: PhysicalBatchKey) -> int:
        text = f"pieces:{self.seed}:{self.rank}:{key.step}:{key.index}"  # "pieces": the draws of earlier runs
        return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "little")

    def __getitem__(self, key: PhysicalBatchKey) -> PhysicalBatch:
        with torch.random.fork_rng(devices=[]):  # LatentDataset draws from torch's global RNG: seed it per batch
            torch.manual_seed(self._seed(key))
            samples = [self.dataset[row] for row in key.rows]
            latents = torch.stack([s[0] for s in samples]) if samples else torch.zeros(0, *self.dataset.latent_shape)
            labels = torch.stack([s[1] for s in samples]) if samples else torch.zeros(0, dtype=torch.long)
            labels = drop_labels(labels, self.class_dropout_prob, self.null_label)
        mask = torch.ones(len(labels), dtype=torch.bool)
        padding = 0 if self.padded_size is None else self.padded_size - len(labels)
        if padding > 0:
            latents = torch.cat([latents, latents.new_zeros(padding, *latents.shape[1:])])
            labels = torch.cat([labels, labels.new_full((padding,), self.null_label)])
            mask = torch.cat([mask, mask.new_zeros(padding)])
        return PhysicalBatch(key.step, key.last, latents, labels, mask)


def _as_is(batch: PhysicalBatch) -> PhysicalBatch:
    return batch


def physical_batch_loader(
    dataset: PhysicalBatchDataset, keys: Iterable[PhysicalBatchKey], num_workers: int, pin_memory: bool
) -> DataLoader:
    """A DataLoader that builds the physical batches in `num_workers` processes (0: in this one), ahead of the step."""
    return DataLoader(
        dataset,
        batch_size=None,
        sampler=keys,
        num_workers=num_workers,
        pin_memory=pin_memory,
        collate_fn=_as_is,
        generator=torch.Generator(),  # its worker seeds go unused; drawn from torch's RNG, they would shift it
    )
