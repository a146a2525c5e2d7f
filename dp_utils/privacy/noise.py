"""Gaussian noise for DP-SGD, added in place: t <- t + N(0, std^2 I) for every tensor t.

On CPU, `NoiseAhead` draws the next step's noise on a background thread while the current step computes (torch's CPU
sampler is serial, and its cost is that of a whole optimizer step), from generators expanded from 248 bits of the
caller's generator, so that runs stay resumable from the caller's generator state. On an accelerator,
`add_noise_foreach_` draws one flat normal vector per chunk of tensors and adds it with `torch._foreach_add_` (a few
kernels, not two per tensor).

A step whose noise is not in every gradient must never be taken: a failure, in any thread, raises `NoiseError` in
the caller's thread, so that the optimizer neither applies nor accounts the step.
"""

from __future__ import annotations

import math
from concurrent.futures import Future, ThreadPoolExecutor

import torch

from .randomness import fork_entropy, generator_from_entropy

CHUNK_NUMEL = 2**26  # elements per flat draw on an accelerator: 256 MiB of fp32 scratch at most
DRAW_BLOCK_NUMEL = 2**20  # elements per normal_ call of a CPU draw


class NoiseError(RuntimeError):
    """Drawing or adding the noise failed: the gradients hold partial noise and the step must not be taken."""


class NoiseAhead:
    """The next logical batch's noise drawn on a background thread into the gradient buffers themselves (CPU).

    `start(buffers, std, generator)`, called where the buffers would be zeroed, overwrites them with N(0, std^2) on
    a worker thread while the next forward runs; the backward then adds the clipped sums onto the noise (`wait()`
    first), and the step adds nothing. No zeroing pass and no noise pass remain in the step. The draws come from a
    generator whose whole state is expanded from 248 bits drawn from `generator` in the caller's thread
    (`fork_entropy`), so the worker never touches the caller's generator. `discard(generator)` waits, and puts the
    generator back to its state before that fork: call it (then zero the buffers) before saving the generator's
    state, and a run resumed from it draws exactly the noise an uninterrupted run draws (never one already applied).
    """

    def __init__(self):
        self._worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="dp-noise")  # one thread, kept
        self._pending: Future | None = None
        self._state_before_fork: torch.Tensor | None = None  # the caller's generator before the draw
        self.drawn = False  # the buffers hold (or are being filled with) the coming step's noise

    def start(self, buffers: list[torch.Tensor], std: float, generator: torch.Generator | None) -> None:
        _check_std(std)
        self._state_before_fork = None if generator is None else generator.get_state()
        entropy = fork_entropy(generator, 1)[0]
        self._pending = self._worker.submit(_draw_into, buffers, entropy, std)
        self.drawn = True

    def wait(self) -> None:
        """Until the draw is made; a failure in the worker is raised here, in the caller's thread."""
        pending, self._pending = self._pending, None
        failure = pending.exception() if pending is not None else None
        if failure is not None:
            self.drawn = False
            raise NoiseError(f"Drawing the noise failed ({failure!r}): this step must not be taken.") from failure

    def discard(self, generator: torch.Generator | None) -> None:
        """Drop the drawn noise (the caller zeroes the buffers); the generator goes back to before its fork."""
        if self._pending is not None:
            self._pending.exception()  # waits; a failure of a dropped draw does not matter
            self._pending = None
        if self.drawn and generator is not None and self._state_before_fork is not None:
            generator.set_state(self._state_before_fork)
        self.drawn, self._state_before_fork = False, None


def _draw_into(draws: list[torch.Tensor], entropy: list[int], std: float) -> None:
    """N(0, std^2) values into every tensor, from a generator expanded from `entropy`; in blocks of
    DRAW_BLOCK_NUMEL elements: few blocks, since the worker takes the GIL back from the main thread between two."""
    generator = generator_from_entropy(entropy)
    with torch.no_grad():
        for z in draws:
            for block in z.view(-1).split(DRAW_BLOCK_NUMEL):
                block.normal_(0.0, std, generator=generator)


def add_noise_foreach_(
    tensors: list[torch.Tensor],
    std: float,
    generator: torch.Generator | None = None,
    chunk_numel: int = CHUNK_NUMEL,
) -> None:
    """t <- t + std * z, z ~ N(0, I), for every t, in a few fused passes (any device; used off CPU).

    The tensors are grouped by device and dtype into chunks of at most `chunk_numel` elements (a larger tensor is a
    chunk alone); each chunk gets one flat `randn` from `generator`, split into views shaped like its tensors.
    """
    _check_std(std)
    if std == 0:
        return
    with torch.no_grad():
        for chunk in tensor_chunks(tensors, chunk_numel):
            sizes = [t.numel() for t in chunk]
            flat = torch.randn(sum(sizes), dtype=chunk[0].dtype, device=chunk[0].device, generator=generator)
            torch._foreach_add_(
                chunk, [z.view(t.shape) for z, t in zip(flat.split(sizes), chunk, strict=True)], alpha=std
            )
            del flat  # freed before the next chunk's draw: one chunk of scratch at a time


def add_secure_noise_(tensors: list[torch.Tensor], std: float, generator: torch.Generator | None = None) -> None:
    """t <- t + N(0, std^2) with Opacus' secure_mode draws (robust to floating-point attacks).

    The same draws as `opacus.optimizers.optimizer._generate_noise(std, t, generator, secure_mode=True)`: one
    discarded sample, then (z1 + z2 + z3 + z4) / 2 with z_i ~ N(0, std^2) (Holohan et al., arXiv:2107.10138, n = 2).
    """
    _check_std(std)
    if std == 0:
        return
    with torch.no_grad():
        for t in tensors:
            torch.normal(mean=0, std=std, size=(1, 1), device=t.device, generator=generator)  # thrown away
            total = torch.zeros(t.shape, device=t.device, dtype=t.dtype)
            for _ in range(4):
                total += torch.normal(mean=0, std=std, size=t.shape, device=t.device, generator=generator)
            t.add_(total / 2)


def _check_std(std: float) -> None:
    """A NaN, infinite or negative std would leave the gradients without (valid) noise: refuse it."""
    if not (math.isfinite(std) and std >= 0):
        raise NoiseError(f"The noise std must be finite and >= 0, got {std} (check noise_multiplier, max_grad_norm).")


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
