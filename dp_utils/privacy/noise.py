"""Gaussian noise for DP-SGD, added in place: grad <- scale * grad + N(0, std^2 I) for every parameter.

The scaling by 1 / batch size rides in the noise pass: one read and write of every gradient, not two.

On CPU the draws are serial per generator and fresh tensors fault in fresh pages, so the parameters are split over
the intra-op threads; each thread draws into one reused scratch buffer, the caller's thread from the caller's
generator (or torch's global one), each other thread from its own generator, whose whole state is expanded from 248
bits drawn from the caller's: runs stay resumable from the caller's generator state, and no thread's stream is one
of the 2^32 that torch's `manual_seed` gives.

On an accelerator, one randn + mul + add per parameter is three small kernels per tensor (thousands per step for a
DiT-XL); `add_noise_foreach_` instead draws one flat normal vector per chunk of tensors (at most CHUNK_NUMEL
elements), splits it into views and applies it with `torch._foreach_mul_` / `torch._foreach_add_`.

A step whose noise is not in every gradient must never be taken: any failure, in any thread, raises `NoiseError`
from `add_` once every thread has stopped, so that the optimizer neither applies nor accounts the step.
"""

from __future__ import annotations

import math
import threading

import torch

from .randomness import fork_entropy, generator_from_entropy

CHUNK_NUMEL = 2**26  # elements per flat draw on an accelerator: 256 MiB of fp32 scratch at most
NUMEL_PER_THREAD = 2**15  # on CPU, fewer elements per share than this are drawn on fewer threads


class NoiseError(RuntimeError):
    """Drawing or adding the noise failed: the gradients hold partial noise and the step must not be taken."""


class GaussianNoise:
    """Scales tensors and adds N(0, std^2) in place; keeps per-thread scratch buffers between calls."""

    def __init__(self):
        self._scratch: dict[tuple, torch.Tensor] = {}

    def add_(
        self, tensors: list[torch.Tensor], std: float, generator: torch.Generator | None = None, scale: float = 1.0
    ) -> None:
        """t <- scale * t + N(0, std^2) for every t; the noise comes from `generator` (None: torch's global RNG).

        Raises NoiseError if any tensor may have been left without its noise.
        """
        _check_std_and_scale(std, scale)
        if std == 0 or not tensors:
            if scale != 1:
                for t in tensors:
                    t.mul_(scale)
            return
        on_cpu = [t for t in tensors if t.device.type == "cpu"]
        elsewhere = [t for t in tensors if t.device.type != "cpu"]
        if elsewhere:
            add_noise_foreach_(elsewhere, std, generator, scale)
        if on_cpu:
            self._add_on_threads_(on_cpu, std, generator, scale)

    def _add_on_threads_(
        self, tensors: list[torch.Tensor], std: float, generator: torch.Generator | None, scale: float
    ) -> None:
        """The CPU pass: one share of the tensors per intra-op thread (the caller is one); every failure is collected.

        Small gradients get fewer shares (at least NUMEL_PER_THREAD elements each): starting a thread costs more than
        drawing a few thousand normals.
        """
        total = sum(t.numel() for t in tensors)
        shares = _balanced_shares(tensors, min(torch.get_num_threads(), math.ceil(total / NUMEL_PER_THREAD)))
        entropies = fork_entropy(generator, len(shares) - 1)  # drawn before share 0 draws from `generator`
        failures: list[BaseException] = []

        def run(share: list[torch.Tensor], entropy: list[int] | None, index: int) -> None:
            try:
                source = generator if entropy is None else generator_from_entropy(entropy)
                self._add_share(share, std, scale, source, index)
            except BaseException as error:  # re-raised below, in the caller's thread
                failures.append(error)

        workers = [
            threading.Thread(target=run, args=(share, entropy, i))
            for i, (share, entropy) in enumerate(zip(shares[1:], entropies, strict=True), start=1)
        ]
        for worker in workers:
            worker.start()
        run(shares[0], None, 0)  # the caller's share, from the caller's generator
        for worker in workers:
            worker.join()
        if failures:
            raise NoiseError(
                f"Adding Gaussian noise failed in {len(failures)} of {len(shares)} threads ({failures[0]!r}): "
                "some gradients have no noise, so this step must not be taken or accounted."
            ) from failures[0]

    def _add_share(
        self, share: list[torch.Tensor], std: float, scale: float, generator: torch.Generator | None, index: int
    ) -> None:
        with torch.no_grad():
            for t in share:
                scratch = self._scratch.get((index, t.dtype))
                if scratch is None or scratch.numel() < t.numel():
                    # share[0] is the largest tensor of the share (_balanced_shares deals them largest first)
                    scratch = self._scratch[index, t.dtype] = torch.empty(share[0].numel(), dtype=t.dtype)
                noise = scratch[: t.numel()].view(t.shape).normal_(0.0, std, generator=generator)
                torch.add(noise, t, alpha=scale, out=t)


def add_noise_foreach_(
    tensors: list[torch.Tensor],
    std: float,
    generator: torch.Generator | None = None,
    scale: float = 1.0,
    chunk_numel: int = CHUNK_NUMEL,
) -> None:
    """t <- scale * t + std * z, z ~ N(0, I), for every t, in a few fused passes (any device; used off CPU).

    The tensors are grouped by device and dtype into chunks of at most `chunk_numel` elements (a larger tensor is a
    chunk alone); each chunk gets one flat `randn` from `generator`, split into views shaped like its tensors.
    """
    _check_std_and_scale(std, scale)
    with torch.no_grad():
        for chunk in tensor_chunks(tensors, chunk_numel):
            if scale != 1:
                torch._foreach_mul_(chunk, scale)
            if std == 0:
                continue
            sizes = [t.numel() for t in chunk]
            flat = torch.randn(sum(sizes), dtype=chunk[0].dtype, device=chunk[0].device, generator=generator)
            torch._foreach_add_(
                chunk, [z.view(t.shape) for z, t in zip(flat.split(sizes), chunk, strict=True)], alpha=std
            )
            del flat  # freed before the next chunk's draw: one chunk of scratch at a time


def add_secure_noise_(
    tensors: list[torch.Tensor], std: float, generator: torch.Generator | None = None, scale: float = 1.0
) -> None:
    """t <- scale * t + N(0, std^2) with Opacus' secure_mode draws (robust to floating-point attacks).

    The same draws as `opacus.optimizers.optimizer._generate_noise(std, t, generator, secure_mode=True)`: one
    discarded sample, then (z1 + z2 + z3 + z4) / 2 with z_i ~ N(0, std^2) (Holohan et al., arXiv:2107.10138, n = 2).
    """
    _check_std_and_scale(std, scale)
    with torch.no_grad():
        for t in tensors:
            t.mul_(scale)
            if std == 0:
                continue
            torch.normal(mean=0, std=std, size=(1, 1), device=t.device, generator=generator)  # thrown away
            total = torch.zeros(t.shape, device=t.device, dtype=t.dtype)
            for _ in range(4):
                total += torch.normal(mean=0, std=std, size=t.shape, device=t.device, generator=generator)
            t.add_(total / 2)


def _check_std_and_scale(std: float, scale: float) -> None:
    """A NaN, infinite or negative std would leave the gradients without (valid) noise: refuse it."""
    if not (math.isfinite(std) and std >= 0):
        raise NoiseError(f"The noise std must be finite and >= 0, got {std} (check noise_multiplier, max_grad_norm).")
    if not math.isfinite(scale):
        raise NoiseError(f"The gradient scale must be finite, got {scale}; check the expected batch size.")


def tensor_chunks(tensors: list[torch.Tensor], max_numel: int) -> list[list[torch.Tensor]]:
    """The tensors grouped by device and dtype, in order, at most `max_numel` elements per chunk (or one tensor)."""
    groups: dict[tuple, list[list[torch.Tensor]]] = {}
    sizes: dict[tuple, int] = {}
    for t in tensors:
        key = (t.device, t.dtype)
        if key not in groups:
            groups[key], sizes[key] = [[]], 0
        if groups[key][-1] and sizes[key] + t.numel() > max_numel:
            groups[key].append([])
            sizes[key] = 0
        groups[key][-1].append(t)
        sizes[key] += t.numel()
    return [chunk for chunks in groups.values() for chunk in chunks]


def _balanced_shares(tensors: list[torch.Tensor], parts: int) -> list[list[torch.Tensor]]:
    """Split tensors into at most `parts` lists of similar total size (largest first, to the lightest list)."""
    shares: list[list[torch.Tensor]] = [[] for _ in range(max(1, min(parts, len(tensors))))]
    sizes = [0] * len(shares)
    for t in sorted(tensors, key=torch.Tensor.numel, reverse=True):
        lightest = sizes.index(min(sizes))
        shares[lightest].append(t)
        sizes[lightest] += t.numel()
    return shares
