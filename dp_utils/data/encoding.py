"""Encoding images into latent cache rows: read and preprocess in DataLoader workers, encode with the VAE.

Used by `precompute_latents.py`; the rows' format is described in `latent_cache.py`.
"""

from __future__ import annotations

import argparse
import logging

import torch
from diffusers import AutoencoderKL
from tqdm.auto import tqdm

from ..errors import UserError
from .images import ImageSource, content_digest, load_image, preprocess_image

logger = logging.getLogger(__name__)


def to_model_input(pixels: torch.Tensor, flip: bool) -> torch.Tensor:
    """`(B, H, W, 3)` uint8 -> `(B, V, 3, H, W)` float in [-1, 1], with the mirrored image as view 1 if `flip`."""
    x = pixels.permute(0, 3, 1, 2).float() / 127.5 - 1.0  # (B, 3, H, W)
    views = [x, x.flip(-1)] if flip else [x]
    return torch.stack(views, dim=1)  # (B, V, 3, H, W)


@torch.no_grad()
def encode_batch(vae: AutoencoderKL, x: torch.Tensor, scaling_factor: float, shift_factor: float) -> tuple:
    """Latent mean and std of `x` `(N, 3, H, W)`, mapped as training expects: `(z - shift) * scaling_factor`."""
    dist = vae.encode(x).latent_dist
    return (dist.mean - shift_factor) * scaling_factor, dist.std * scaling_factor


class ImageRows(torch.utils.data.Dataset):
    """Input images `start..end` read and preprocessed in DataLoader workers.

    Each item is `(i, uint8 (H, W, 3) or None, error or None, content digest)`: the digest is of the very bytes that
    were decoded, so a shard's recorded fingerprint is that of what it holds.
    """

    def __init__(self, source: ImageSource, start: int, end: int, resolution: int) -> None:
        self.source, self.start, self.end, self.resolution = source, start, end, resolution

    def __len__(self) -> int:
        return self.end - self.start

    def __getitem__(self, k: int) -> tuple:
        i, data = self.start + k, None
        try:
            data = self.source.read_bytes(i)
            pixels = torch.from_numpy(preprocess_image(load_image(data), self.resolution))
        except Exception as error:  # any failure to read or decode makes the file unusable; reported, not hidden
            return i, None, f"{type(error).__name__}: {error}", content_digest(error if data is None else data)
        return i, pixels, None, content_digest(data)


def encode_shard(
    source: ImageSource,
    start: int,
    end: int,
    args: argparse.Namespace,
    vae: AutoencoderKL | None,
    latent_shape: list[int],
    progress: tqdm,
    text_encoders=None,
) -> tuple[dict[str, list], list[dict], str]:
    """Encode input images `start..end`: the cache columns of the readable ones, what was skipped and why, and the
    fingerprint of the bytes that were read."""
    num_views = 2 if args.random_flip else 1
    loader = torch.utils.data.DataLoader(
        ImageRows(source, start, end, args.resolution),
        batch_size=args.batch_size,
        num_workers=args.dataloader_num_workers,
        collate_fn=list,
    )
    rows = {"mean": [], "std": [], "label": [], "source": []}
    skipped, digests = [], []
    for batch in loader:
        for i, _, error, digest in batch:
            digests.append(digest)
            if error is None:
                continue
            if args.strict:
                raise UserError(
                    f"Cannot read image {source.ids[i]}: {error}. Fix or remove it, or run without "
                    "--strict to skip unreadable images."
                )
            logger.warning(f"Skipping unreadable image {source.ids[i]}: {error}")
            skipped.append({"source": source.ids[i], "error": error})
        good = [(i, pixels) for i, pixels, error, _ in batch if error is None]
        progress.update(len(batch))
        if not good:
            continue
        x = to_model_input(torch.stack([p for _, p in good]), args.random_flip)  # (B, V, 3, H, W)
        if vae is None:
            mean, std = x, None
        else:
            flat = x.flatten(0, 1).to(vae.device, dtype=vae.dtype)  # (B * V, 3, H, W)
            mean, std = encode_batch(vae, flat, vae.config.scaling_factor, vae.config.get("shift_factor") or 0.0)
            rows["std"].append(std.float().cpu().reshape(len(good), num_views, *latent_shape).numpy())
        rows["mean"].append(mean.float().cpu().reshape(len(good), num_views, *latent_shape).numpy())
        if source.labels is not None:
            rows["label"] += [source.labels[i] for i, _ in good]
        rows["source"] += [source.ids[i] for i, _ in good]
        if text_encoders is not None:  # the caption's encoding joins its image's row
            for encoded in text_encoders.encode([source.captions[i] for i, _ in good]):
                for name, value in encoded.items():
                    rows.setdefault(name, []).append(value)
    return rows, skipped, source.fingerprint(start, end, digests)
