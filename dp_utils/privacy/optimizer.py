"""The DP optimizer: the noisy step of DP-SGD over the clipping engine's flat gradient buffers.

The engine leaves sum_e c_e g_e / B in the buffers (every example clipped to C; B the expected logical batch size
q N, folded into the clip factors so that no pass over the buffers scales them), adding each physical batch to
them. At the end of a logical batch `step()` runs, in order: refuse sums already used or polluted by an unclipped
gradient; refuse a non-finite per-example norm (one device flag, read once per logical batch); add the noise
N(0, (sigma C / B)^2) on rank 0 (each buffer in one pass; on CPU it is drawn on a worker thread into the buffers at
zero_grad, under the sums to come, and nothing is left to do here: `noise.NoiseAhead`); average over ranks; call
the accountant's hook; step the wrapped optimizer. A failure before the hook leaves the step neither applied nor
accounted. `.grad` is never rebound: zero_grad() clears the buffers in place.

Opacus' optimizers stay in use for its reference modes (`opacus_ghost`, `opacus_hooks`); this one replaces its
fast-gradient-clipping optimizer, whose private accumulation stages we would otherwise override.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from ..clipping.engine import ClippingEngine
from .cuda_graphs import GraphedNoisyStep, set_capturable
from .noise import NoiseAhead, add_noise_foreach_, add_secure_noise_, tensor_chunks

BUCKET_NUMEL = 25_000_000  # elements per all-reduce of the clipped sums


class DPOptimizer(torch.optim.Optimizer):
    """Wraps `optimizer` (AdamW, SGD, ...); its param_groups, state and state_dict are the wrapped optimizer's."""

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        *,
        clipping_engine: ClippingEngine,
        noise_multiplier: float,
        max_grad_norm: float,
        expected_batch_size: float,
        generator: torch.Generator | None = None,
        secure_mode: bool = False,
        world_size: int = 1,
        rank: int = 0,
    ):
        # no super().__init__: the wrapped optimizer owns the parameter groups and the state (as Opacus' wrappers)
        self.original_optimizer = optimizer
        self.clipping_engine = clipping_engine
        self.noise_multiplier = float(noise_multiplier)
        self.max_grad_norm = float(max_grad_norm)
        if not (math.isfinite(expected_batch_size) and expected_batch_size > 0):
            raise ValueError(f"expected_batch_size must be a positive finite number, got {expected_batch_size!r}")
        self.expected_batch_size = float(expected_batch_size)  # per rank, as Opacus counts it
        clipping_engine.sum_scale = 1.0 / self.expected_batch_size
        self.generator = generator
        self.secure_mode = secure_mode
        self.world_size, self.rank = world_size, rank
        self.step_hook: Callable[[DPOptimizer], None] | None = None
        self.noise_ahead = NoiseAhead()
        self.graphed_step: GraphedNoisyStep | None = None  # set by use_cuda_graphs()
        self._skip_next = False
        self._last_step_skipped = False  # the logical batch goes on: zero_grad() keeps the sums
        self._sums_used = False  # set by a noisy step; zero_grad() clears it
        self.steps_called = 0  # step() calls, skipped ones included (PhysicalBatchLoader checks one per batch)

    @property
    def param_groups(self) -> list[dict]:
        return self.original_optimizer.param_groups

    @param_groups.setter
    def param_groups(self, value: list[dict]) -> None:
        self.original_optimizer.param_groups = value

    @property
    def state(self) -> dict:
        return self.original_optimizer.state

    @property
    def defaults(self) -> dict:
        return self.original_optimizer.defaults

    def state_dict(self) -> dict:
        return self.original_optimizer.state_dict()

    def load_state_dict(self, state_dict: dict) -> None:
        self.original_optimizer.load_state_dict(state_dict)
        set_capturable(self.original_optimizer, self.graphed_step is not None)  # whatever run saved the state
        if self.graphed_step is not None:
            self.graphed_step.graph = None  # it holds the replaced state tensors: capture again

    def discard_noise_ahead(self) -> None:
        """Before saving the noise generator's state: the next step's noise, drawn ahead into the buffers on CPU,
        is dropped and the generator rewound to before it, so that a run resumed from that state draws the same
        noise."""
        if self.noise_ahead.drawn:
            self.noise_ahead.discard(self.generator)
            self.clipping_engine.grads.before_use = None
            self.clipping_engine.grads.zero_()

    def use_cuda_graphs(self) -> None:
        """Noise, all-reduce and the wrapped step as one CUDA graph after a few eager steps (`GraphedNoisyStep`)."""
        set_capturable(self.original_optimizer, True)

        def noisy_step() -> None:
            self.add_noise()
            self.original_optimizer.step()

        self.graphed_step = GraphedNoisyStep(noisy_step, self.generator, self.original_optimizer)

    def attach_step_hook(self, fn: Callable[[DPOptimizer], None]) -> None:
        self.step_hook = fn

    def signal_skip_step(self, do_skip: bool = True) -> None:
        """The next step() ends a physical batch, not the logical batch: it keeps the sums and takes no step."""
        self._skip_next = do_skip

    @property
    def mid_logical_batch(self) -> bool:
        """A physical batch that is not its logical batch's last is out (or stepped): the sums are partial."""
        return self._skip_next or self._last_step_skipped

    def abandon_logical_batch(self) -> None:
        """A logical batch left before its last physical batch: its sums are dropped (never noised or used), so
        that they cannot join the next logical batch's step. Between logical batches there is nothing to drop."""
        if not self.mid_logical_batch:
            return
        self._skip_next = self._last_step_skipped = False
        self.zero_grad()

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Clear the sums for the next logical batch (`set_to_none` is accepted and ignored: the buffers are
        static): on CPU the buffers are overwritten with that batch's noise on a worker thread (`NoiseAhead`; the
        next backward adds onto it), else zeroed. After a skipped step it does nothing, so that the logical batch's
        sums keep accumulating."""
        if self._last_step_skipped:
            return
        self.clipping_engine.tainted = False
        self._sums_used = False
        grads = self.clipping_engine.grads
        std = self.noise_std()
        on_cpu = all(b.device.type == "cpu" for b in grads.buffers)
        if std > 0 and on_cpu and not self.secure_mode and self.graphed_step is None:
            self.noise_ahead.discard(None)  # a draw not used (zero_grad twice): its buffers are overwritten
            grads.before_use = self._wait_for_noise
            self.noise_ahead.start(grads.buffers, std, self.generator)
        else:
            grads.zero_()

    def _wait_for_noise(self) -> None:
        try:
            self.noise_ahead.wait()
        except Exception:
            self.clipping_engine.grads.zero_()  # no partial noise under the sums: the step adds it in full
            raise

    def step(self, closure: Callable | None = None):
        """The noisy step at the end of a logical batch; nothing after a physical batch's (signal_skip_step)."""
        if closure is not None:
            with torch.enable_grad():
                closure()
        self.steps_called += 1
        if self._skip_next:
            self._skip_next, self._last_step_skipped = False, True
            return None
        self._last_step_skipped = False
        self._check_sums()
        self._sums_used = True  # before the noise: a step retried after a failure would reuse partly noised sums
        if self.graphed_step is not None:
            self.graphed_step()  # noise, all-reduce and the wrapped step, replayed
        else:
            self.add_noise()
        if self.step_hook:
            self.step_hook(self)  # the accountant: only once the noise is in every gradient
        return None if self.graphed_step is not None else self.original_optimizer.step()

    def _check_sums(self) -> None:
        engine = self.clipping_engine
        if self._sums_used:
            raise ValueError(
                "Gradients haven't been cleared since the last optimizer step (or a failed one): call "
                "optimizer.zero_grad() after every optimizer.step(), or the privacy guarantee does not hold."
            )
        if engine.tainted:
            raise RuntimeError(
                "An unclipped gradient reached the sums (a backward outside the clipping engine): this step is "
                "refused. Call optimizer.zero_grad() and back-propagate only the loss the private criterion returns."
            )
        if engine.nonfinite is not None:
            nonfinite = bool(engine.nonfinite)  # the one host sync of a logical batch
            engine.nonfinite.zero_()
            if nonfinite:
                raise FloatingPointError(
                    "A per-example gradient norm is NaN or infinite (a non-finite loss or activation): the step is "
                    "neither applied nor accounted. Likely causes: a learning rate too high, fp16 without loss "
                    "scaling, or NaN/inf in the data. Call optimizer.zero_grad() before the next step."
                )

    def noise_std(self) -> float:
        """sigma C / B on rank 0 (the only rank that adds noise), 0 elsewhere."""
        return self.noise_multiplier * self.max_grad_norm / self.expected_batch_size if self.rank == 0 else 0.0

    def add_noise(self) -> None:
        """grad = sum / B + N(0, (sigma C / B)^2) in place (the engine scaled the sums); across ranks the noise is
        rank 0's, then the sums are reduced (divided by the number of ranks, B being per rank)."""
        grads = self.clipping_engine.grads
        buffers = grads.buffers
        if self.noise_ahead.drawn:  # drawn into the buffers before the sums were added
            if grads.before_use is not None:  # a step without a backward since zero_grad
                grads.attach()
            self.noise_ahead.drawn = False
        elif self.secure_mode:
            add_secure_noise_(buffers, self.noise_std(), self.generator)
        else:
            add_noise_foreach_(buffers, self.noise_std(), self.generator)
        if self.world_size > 1:
            all_reduce_in_buckets_(buffers, divisor=self.world_size)


def all_reduce_in_buckets_(tensors: list[torch.Tensor], divisor: float = 1, bucket_numel: int = BUCKET_NUMEL) -> None:
    """t <- (sum over ranks of t) / divisor for every t, with one all-reduce per bucket of `bucket_numel` elements.

    Each bucket (tensors of one device and dtype, in order) is flattened into one buffer, reduced and copied back;
    a bucket of one contiguous tensor is reduced in place. Same sums as one all-reduce per tensor.
    """
    for bucket in tensor_chunks(tensors, bucket_numel):
        alone = len(bucket) == 1 and bucket[0].is_contiguous()
        flat = bucket[0] if alone else torch.cat([t.reshape(-1) for t in bucket])  # (sum of numel,)
        torch.distributed.all_reduce(flat, op=torch.distributed.ReduceOp.SUM)
        if divisor != 1:
            flat.div_(divisor)
        if not alone:
            parts = flat.split([t.numel() for t in bucket])
            torch._foreach_copy_(bucket, [part.view(t.shape) for part, t in zip(parts, bucket, strict=True)])
