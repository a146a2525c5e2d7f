"""Augmentation multiplicity: an image's K rows (--noise_multiplicity) as K augmented views, clipped as one example.

The engine already sums an image's K rows before clipping, so the views change no guarantee: the image's whole
contribution is still clipped to C. Shifts by a latent pixel keep a digit a digit (and an object the object).
"""

from __future__ import annotations

import torch

AUGMENTATIONS = ("none", "shift")


def shift_views(latents: torch.Tensor, max_shift: int = 1, generator: torch.Generator | None = None) -> torch.Tensor:
    """Each row (N, C, H, W) shifted by its own random whole offset in [-max_shift, max_shift] per axis; the edges
    repeat (clamped indices: replicate padding), so a dark border stays dark. On the device, no host sync: a CUDA
    graph can hold it."""
    n, channels, height, width = latents.shape
    device = latents.device
    dy, dx = torch.randint(-max_shift, max_shift + 1, (2, n, 1), generator=generator, device=device)
    rows = (torch.arange(height, device=device) + dy).clamp_(0, height - 1)  # (N, H)
    columns = (torch.arange(width, device=device) + dx).clamp_(0, width - 1)  # (N, W)
    index = torch.arange(n, device=device)[:, None, None, None], torch.arange(channels, device=device)[:, None, None]
    return latents[index[0], index[1], rows[:, None, :, None], columns[:, None, None, :]]


def augment(latents: torch.Tensor, name: str) -> torch.Tensor:
    """The rows under --augmentation (`none` returns them as they are)."""
    if name == "none":
        return latents
    if name == "shift":
        return shift_views(latents)
    raise ValueError(f"unknown augmentation {name!r}; one of {AUGMENTATIONS}")
