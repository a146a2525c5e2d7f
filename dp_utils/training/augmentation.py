"""Augmentation multiplicity: an image's K rows (--noise_multiplicity) as K augmented views, clipped as one example.

The engine already sums an image's K rows before clipping, so the views change no guarantee: the image's whole
contribution is still clipped to C. Shifts by a latent pixel keep a digit a digit (and an object the object).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

AUGMENTATIONS = ("none", "shift")


def shift_views(latents: torch.Tensor, max_shift: int = 1, generator: torch.Generator | None = None) -> torch.Tensor:
    """Each row (N, C, H, W) shifted by its own random whole offset in [-max_shift, max_shift] per axis; the edges
    repeat (replicate padding), so a dark border stays dark."""
    n, _, height, width = latents.shape
    padded = F.pad(latents, (max_shift,) * 4, mode="replicate")
    offsets = torch.randint(0, 2 * max_shift + 1, (n, 2), generator=generator, device="cpu").tolist()
    return torch.stack([padded[i, :, dy : dy + height, dx : dx + width] for i, (dy, dx) in enumerate(offsets)])


def augment(latents: torch.Tensor, name: str) -> torch.Tensor:
    """The rows under --augmentation (`none` returns them as they are)."""
    if name == "none":
        return latents
    if name == "shift":
        return shift_views(latents)
    raise ValueError(f"unknown augmentation {name!r}; one of {AUGMENTATIONS}")
