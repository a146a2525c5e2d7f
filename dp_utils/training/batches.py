"""The physical batches ("pieces") of each step's Poisson batch, built by DataLoader workers.

A step's local batch (this rank's share, `PoissonBatchSampler`) is cut into pieces of at most
`max_physical_batch_size` images; an empty local batch is one empty piece, so that every rank still steps (noise,
all-reduce and accounting stay in step). A piece's random draws (which view of an image, its latent sample, label
dropout) come from a generator seeded by (seed, rank, step, piece), so they do not depend on the number of workers,
on their order, or on a resume: a resumed run builds exactly the pieces an uninterrupted one does.
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
class PieceKey:
    step: int
    index: int  # the piece's position in its step's local batch
    rows: tuple[int, ...]
    last: bool  # the last piece of the step: the optimizer steps after it


@dataclass
class Piece:
    step: int
    last: bool
    latents: torch.Tensor  # (B, C, H, W)
    labels: torch.Tensor  # (B,), dropped labels already replaced by the null label

    def pin_memory(self) -> Piece:  # what DataLoader(pin_memory=True) calls on a custom batch type
        return Piece(self.step, self.last, self.latents.pin_memory(), self.labels.pin_memory())


def piece_keys(batches: Iterable[list[int]], start_step: int, size: int) -> Iterator[PieceKey]:
    """The pieces of each step's local batch, steps numbered from `start_step`."""
    for step, rows in enumerate(batches, start_step):
        starts = range(0, len(rows), size) or [0]
        for index, start in enumerate(starts):
            yield PieceKey(step, index, tuple(rows[start : start + size]), last=start + size >= len(rows))


class PieceDataset(Dataset):
    """Maps a PieceKey to its Piece: the rows' latent samples and labels, drawn from the piece's own generator."""

    def __init__(self, dataset: LatentDataset, class_dropout_prob: float, null_label: int, seed: int, rank: int):
        self.dataset, self.class_dropout_prob, self.null_label = dataset, class_dropout_prob, null_label
        self.seed, self.rank = seed, rank

    def _seed(self, key: PieceKey) -> int:
        text = f"pieces:{self.seed}:{self.rank}:{key.step}:{key.index}"
        return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "little")

    def __getitem__(self, key: PieceKey) -> Piece:
        with torch.random.fork_rng(devices=[]):  # LatentDataset draws from torch's global RNG: seed it per piece
            torch.manual_seed(self._seed(key))
            samples = [self.dataset[row] for row in key.rows]
            latents = torch.stack([s[0] for s in samples]) if samples else torch.zeros(0, *self.dataset.latent_shape)
            labels = torch.stack([s[1] for s in samples]) if samples else torch.zeros(0, dtype=torch.long)
            labels = drop_labels(labels, self.class_dropout_prob, self.null_label)
        return Piece(key.step, key.last, latents, labels)


def _as_is(piece: Piece) -> Piece:
    return piece


def piece_loader(dataset: PieceDataset, keys: Iterable[PieceKey], num_workers: int, pin_memory: bool) -> DataLoader:
    """A DataLoader that builds the pieces in `num_workers` processes (0: in this one), ahead of the training step."""
    return DataLoader(
        dataset,
        batch_size=None,
        sampler=keys,
        num_workers=num_workers,
        pin_memory=pin_memory,
        collate_fn=_as_is,
        generator=torch.Generator(),  # its worker seeds go unused; drawn from torch's RNG, they would shift it
    )
