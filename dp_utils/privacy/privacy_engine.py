"""make_private: the Opacus flow (sampler, DP optimizer, accountant) around our clipping engine.

Noise, scaling and accounting follow Opacus' fast-gradient-clipping optimizers: they read the clipped sum from
`.grad`, add N(0, sigma^2 C^2) once per logical batch, divide by the expected batch size, and then call the RDP/PRV
accountant's step hook. Our optimizers own those stages (in place, in one pass, and never accounted when the noise
failed). Poisson sampling is Opacus' `DPDataLoader` in one process and our lock-step `PoissonBatchSampler` across
processes (Opacus' distributed sampler skips empty local batches, so ranks can take different numbers of steps and
hang in the all-reduce). Noise and batches come from a secret drawn from the operating system unless the caller
passes a generator or a sampling seed (`dp_utils.privacy.randomness`): torch's global RNG, which `torch.manual_seed`
and checkpoints replay, drives neither.

Arguments are checked before anything is built: a bad one raises `UserError` naming the problem and the fix.
"""

from __future__ import annotations

import contextlib
import math
import warnings
from collections.abc import Iterator

import numpy as np
import torch
from opacus import GradSampleModule
from opacus.accountants import create_accountant
from opacus.accountants.utils import get_noise_multiplier
from opacus.data_loader import DPDataLoader
from opacus.grad_sample.grad_sample_module_fast_gradient_clipping import GradSampleModuleFastGradientClipping
from opacus.optimizers import (
    DistributedDPOptimizer,
    DistributedDPOptimizerFastGradientClipping,
    DPOptimizer,
    DPOptimizerFastGradientClipping,
)
from opacus.utils.fast_gradient_clipping_utils import DPTensorFastGradientClipping
from torch import nn
from torch.utils.data import DataLoader

from ..clipping.engine import MODES, ClippingEngine
from ..clipping.groups import RowGroups
from ..clipping.losses import DPCriterion, per_sample_mse
from ..errors import UserError
from .noise import GaussianNoise, add_secure_noise_, tensor_chunks
from .randomness import generator_from_entropy, secret_seed, shared_secret_seed
from .sampling import poisson_data_loader

GRAD_SAMPLE_MODES = (*MODES, "opacus_ghost", "opacus_hooks")


ACCOUNTANTS = ("prv", "rdp", "gdp")  # Opacus' accountant registry
MAX_NOISE_MULTIPLIER = 1e6  # Opacus' calibration gives up above it; the accountants overflow far above it
# Opacus' PRV accountant: 0.2 s per epsilon at 0.5, 1.6 s at 0.3, 4.9 s at 0.2, minutes at 0.1 (q = 0.01, 1000 steps)
MIN_PRV_NOISE_MULTIPLIER = 0.2
PRV_CALIBRATION_FLOOR = 20 / 64  # the last point of Opacus' bisection (from 20) above MIN_PRV_NOISE_MULTIPLIER
BUCKET_NUMEL = 25_000_000  # elements per all-reduce of the clipped sums


class PrivacyWarning(UserWarning):
    """A run that is valid but whose guarantee is weaker than its user may think."""


class _FlashStages:
    """The DP step of Opacus' optimizer as named stages, for gradients that arrive clipped and summed.

    pre_step: `check_cleared` (no sum is used twice), `accumulate` (move `.grad` into `summed_grad`), then, at the
    end of a logical batch, `check_finite` (no non-finite per-example norm went into the sums),
    `add_noise_and_scale` (grad = sum / B + N(0, (sigma C / B)^2), B the expected batch size, in place and in one
    pass) and only then the accountant's step hook. A failure in the noise raises before the hook: a step whose
    noise is not in every gradient is neither applied nor accounted.
    """

    clipping_engine: ClippingEngine | None = None  # set by make_private

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.gaussian_noise = GaussianNoise()
        self._sums_used = False  # set by a noisy step; zero_grad() clears it

    def pre_step(self, closure=None) -> bool:
        """The stages before the wrapped optimizer's step; False while the logical batch is not complete."""
        self.check_cleared()
        self.accumulate()
        if self._check_skip_next_step():
            self._is_last_step_skipped = True
            return False
        self.check_finite()
        self.add_noise_and_scale()
        if self.step_hook:
            self.step_hook(self)  # the accountant: only once the noise is in every gradient
        self._is_last_step_skipped = False
        return True

    def check_cleared(self) -> None:
        """Refuse a second noisy step on the same sums: its privacy would not be what is accounted."""
        if self._sums_used:
            raise ValueError(
                "Gradients haven't been cleared since the last optimizer step (or a failed one): call "
                "optimizer.zero_grad() after every optimizer.step(), or the privacy guarantee does not hold."
            )

    def check_finite(self) -> None:
        """Refuse a step whose sums hold a non-finite per-example norm (one host sync per logical batch)."""
        engine = self.clipping_engine
        if engine is None or engine.nonfinite is None:
            return
        nonfinite, engine.nonfinite = bool(engine.nonfinite), None
        if nonfinite:
            raise FloatingPointError(
                "A per-example gradient norm is NaN or infinite (a non-finite loss or activation): the step is "
                "neither applied nor accounted. Likely causes: a learning rate too high, fp16 without loss scaling, "
                "or NaN/inf in the data. Call optimizer.zero_grad() before the next step."
            )

    def accumulate(self) -> None:
        """Move each clipped sum from `.grad` into `summed_grad` (a parameter without `.grad` contributes zero)."""
        for p in self.params:
            grad = p.grad if p.grad is not None else torch.zeros_like(p)
            p.summed_grad = grad if p.summed_grad is None else p.summed_grad.add_(grad)
            p.grad = None  # moved, not copied: a zero_grad between physical batches must not touch the sum

    def add_noise_and_scale(self) -> None:
        """grad = scale * sum + N(0, (sigma C scale)^2) in place, scale = 1 / B; noise on rank 0 only."""
        scale = 1.0 / (self.expected_batch_size * self.accumulated_iterations) if self.loss_reduction == "mean" else 1
        # distributed: the whole noise comes from rank 0, then the sums are reduced
        std = self.noise_multiplier * self.max_grad_norm * scale if getattr(self, "rank", 0) == 0 else 0.0
        self._sums_used = True  # before the noise: a step retried after a failure would reuse partly noised sums
        sums = [p.summed_grad for p in self.params]
        if self.secure_mode:
            add_secure_noise_(sums, std, self.generator, scale=scale)
        else:
            self.gaussian_noise.add_(sums, std, self.generator, scale=scale)
        for p in self.params:
            p.grad = p.summed_grad  # only now: a failed noise pass leaves no gradient to apply

    def add_noise(self):
        raise NotImplementedError("This optimizer adds the noise and scales in one stage: add_noise_and_scale().")

    def scale_grad(self):
        raise NotImplementedError("This optimizer adds the noise and scales in one stage: add_noise_and_scale().")

    def zero_grad(self, set_to_none: bool = False) -> None:
        super().zero_grad(set_to_none)
        self._sums_used = False


class FlashDPOptimizer(_FlashStages, DPOptimizerFastGradientClipping):
    """Opacus' noise-and-scale optimizer for gradients that arrive already clipped and summed."""


class DistributedFlashDPOptimizer(_FlashStages, DistributedDPOptimizerFastGradientClipping):
    """Same, across processes: noise on rank 0 only, clipped sums all-reduced in a few buckets."""

    def reduce_gradients(self) -> None:
        """Sum the noised gradients over the ranks (then divide by the world size for a mean loss)."""
        grads = [p.grad for p in self.params if p.requires_grad]
        all_reduce_in_buckets_(grads, divisor=self.world_size if self.loss_reduction == "mean" else 1)


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


class PrivacyEngine:
    """Opacus-style entry point; keeps the accountant that `get_epsilon` reads."""

    def __init__(self, accountant: str = "prv", secure_mode: bool = False):
        """`secure_mode`: noise drawn as Holohan et al.'s sum of four Gaussians (robust to floating-point attacks).

        The generator is secret in every mode (OS entropy over its whole state, see `dp_utils.privacy.randomness`);
        torch ships no cryptographic generator, so secure_mode does not make it one.
        """
        if accountant not in ACCOUNTANTS:
            raise UserError(f"accountant must be one of {ACCOUNTANTS}, got {accountant!r}; prv is the tightest.")
        self.accountant = create_accountant(mechanism=accountant)
        self.secure_mode = bool(secure_mode)
        self.clipping_engine: ClippingEngine | None = None
        self.dataset_size: int | None = None  # set by make_private; get_epsilon warns about a delta >= 1 / N
        self._warned_deltas: set[float] = set()

    def make_private(
        self,
        *,
        module: nn.Module,
        optimizer: torch.optim.Optimizer,
        data_loader: DataLoader,
        max_grad_norm: float,
        criterion=per_sample_mse,
        noise_multiplier: float | None = None,
        target_epsilon: float | None = None,
        target_delta: float | None = None,
        epochs: int | None = None,
        steps: int | None = None,
        grad_sample_mode: str = "flash_bk",
        poisson_sampling: bool = True,
        noise_multiplicity: int = 1,
        distributed: bool = False,
        noise_generator: torch.Generator | None = None,
        sampling_seed: int | None = None,
    ) -> tuple[nn.Module, DPOptimizer, DPCriterion, DataLoader]:
        """Returns (module, optimizer, criterion, data_loader) ready for DP-SGD.

        `criterion(output, target)` must give per-example losses (B,); the returned wrapper's `backward()` clips
        each example's gradient to `max_grad_norm`. With `noise_multiplicity=K` every example is K consecutive
        rows of the batch, clipped as one (the gradient of the sum of its row losses); or pass `group_ids=` to
        the criterion call. `distributed=True` (one process per rank, no DDP wrapper) makes each rank sample its
        share of the Poisson batch and adds the noise once in total; its batches follow `sampling_seed`, the same
        on every rank, so that a resumed run can rebuild them (`data_loader.batch_sampler.set_step`).

        The noise comes from `noise_generator` and the batches from `sampling_seed`; None (the default) draws them
        from the operating system's entropy (rank 0's, sent to all), so that nobody can replay them. Keep what you
        pass as secret as the data: whoever knows it can subtract the noise.

        Input contract (what the accounting assumes): every layer sees the batch first, one forward per backward,
        and an example appears at most once per logical batch. Bad arguments raise `UserError` before the model or
        the loader is touched (sigma = 0, the non-private baseline, is allowed); a logical batch that covers the
        whole dataset (q = 1) or target_delta >= 1 / N warns with `PrivacyWarning`.
        """
        _check_arguments(
            max_grad_norm=max_grad_norm,
            noise_multiplier=noise_multiplier,
            target_epsilon=target_epsilon,
            target_delta=target_delta,
            epochs=epochs,
            steps=steps,
            grad_sample_mode=grad_sample_mode,
            noise_multiplicity=noise_multiplicity,
            distributed=distributed,
        )
        noise_multiplicity = int(noise_multiplicity)
        epochs, steps = (None if n is None else int(n) for n in (epochs, steps))
        steps_per_epoch = len(data_loader)
        self.dataset_size = len(data_loader.dataset)
        if steps_per_epoch == 0 or self.dataset_size == 0:
            raise UserError("The data loader is empty: DP-SGD needs a dataset with at least one row.")
        sample_rate = 1 / steps_per_epoch  # Opacus' rate: one logical batch per len(data_loader)
        expected_batch_size = self.dataset_size // steps_per_epoch  # int(N q) without N * (1 / L) rounding below
        _warn_weak_sampling(sample_rate, self.dataset_size)
        if target_delta is not None:
            self._warn_large_delta(target_delta)
        if target_epsilon is not None:
            noise_multiplier = self._calibrate(target_epsilon, target_delta, sample_rate, epochs, steps)
        elif 0 < noise_multiplier < MIN_PRV_NOISE_MULTIPLIER and self.accountant.mechanism() == "prv":
            raise UserError(
                f"noise_multiplier = {noise_multiplier} is below {MIN_PRV_NOISE_MULTIPLIER}, where the PRV accountant "
                "takes minutes per epsilon (and the guarantee means little): use accountant 'rdp' (--accountant rdp) "
                "or more noise."
            )
        if noise_generator is None:
            device = next((p.device for p in module.parameters()), torch.device("cpu"))
            noise_generator = generator_from_entropy(secret_seed(), device)
        if poisson_sampling and distributed:
            seed = shared_secret_seed() if sampling_seed is None else sampling_seed
            data_loader = poisson_data_loader(data_loader, seed=seed, distributed=True)
        elif poisson_sampling:
            entropy = secret_seed() if sampling_seed is None else sampling_seed
            data_loader = DPDataLoader.from_data_loader(data_loader, generator=generator_from_entropy(entropy))
        if distributed:
            expected_batch_size /= torch.distributed.get_world_size()  # per rank, as Opacus does

        if grad_sample_mode in MODES:
            self.clipping_engine = ClippingEngine(module, max_grad_norm, grad_sample_mode)
            optimizer_class = DistributedFlashDPOptimizer if distributed else FlashDPOptimizer
        elif grad_sample_mode == "opacus_ghost":
            module = GradSampleModuleFastGradientClipping(module, max_grad_norm=max_grad_norm, loss_reduction="mean")
            optimizer_class = (
                DistributedDPOptimizerFastGradientClipping if distributed else DPOptimizerFastGradientClipping
            )
        else:
            module = GradSampleModule(module, loss_reduction="mean")
            optimizer_class = DistributedDPOptimizer if distributed else DPOptimizer
        optimizer = optimizer_class(
            optimizer,
            noise_multiplier=noise_multiplier,
            max_grad_norm=max_grad_norm,
            expected_batch_size=expected_batch_size,
            loss_reduction="mean",
            generator=noise_generator,
            secure_mode=self.secure_mode,
        )
        optimizer.attach_step_hook(self.accountant.get_optimizer_hook_fn(sample_rate=sample_rate))
        optimizer.privacy_engine = self
        if grad_sample_mode in MODES:
            optimizer.clipping_engine = self.clipping_engine
        return (
            module,
            optimizer,
            DPCriterion(criterion, self._backward_for(grad_sample_mode, module, optimizer, noise_multiplicity)),
            data_loader,
        )

    def _backward_for(self, grad_sample_mode: str, module: nn.Module, optimizer: DPOptimizer, multiplicity: int):
        """The backward of per-row losses (B,) in each mode."""
        if grad_sample_mode in MODES:
            engine = self.clipping_engine

            def backward(losses, group_ids):
                engine.backward(losses, RowGroups(group_ids, len(losses), multiplicity))

        elif grad_sample_mode == "opacus_ghost":

            def backward(losses, group_ids):
                _opacus_rows_only(group_ids)
                with _quiet_backward_hooks():
                    DPTensorFastGradientClipping(module, optimizer, losses, loss_reduction="mean").backward()

        else:

            def backward(losses, group_ids):
                _opacus_rows_only(group_ids)
                with _quiet_backward_hooks():
                    losses.mean().backward()

        return backward

    def _calibrate(
        self, target_epsilon: float, target_delta: float, sample_rate: float, epochs: int | None, steps: int | None
    ) -> float:
        """Opacus' noise calibration; a budget it cannot reach is the user's to change, so a UserError says how.

        Opacus bisects from 0 on the points 20 / 2^k; its PRV accountant takes minutes per epsilon below a noise
        multiplier of about 0.2, so a budget whose bisection would go below 20 / 64 is refused first.
        """
        steps = steps if steps is not None else int(epochs / sample_rate)
        mechanism = self.accountant.mechanism()
        calibration = dict(target_delta=target_delta, sample_rate=sample_rate, steps=steps)
        try:
            with _quiet_accountant():
                if mechanism == "prv":
                    floor = create_accountant(mechanism="prv")
                    floor.history = [(PRV_CALIBRATION_FLOOR, sample_rate, steps)]
                    if floor.get_epsilon(delta=target_delta) < target_epsilon:
                        raise UserError(
                            f"target_epsilon = {target_epsilon} needs a noise multiplier below "
                            f"{PRV_CALIBRATION_FLOOR}, where the PRV accountant takes minutes per epsilon (and such "
                            "a guarantee means little): use accountant 'rdp' (--accountant rdp), or a smaller "
                            "target_epsilon."
                        )
                return get_noise_multiplier(target_epsilon=target_epsilon, accountant=mechanism, **calibration)
        except (ValueError, RuntimeError) as error:
            if isinstance(error, UserError):
                raise
            raise UserError(
                f"No noise multiplier reaches target_epsilon = {target_epsilon} at target_delta = {target_delta} "
                f"over {steps} steps at sample rate q = {sample_rate:.4g} ({mechanism} accountant: {error}). Allow a "
                "larger epsilon (or delta below 1 / N), train fewer steps or epochs, or use a smaller logical batch."
            ) from error

    def get_epsilon(self, delta: float) -> float:
        """Epsilon spent so far at this delta, by the accountant fed with every noisy step taken (0 before any)."""
        if _as_float(delta) is None or not 0 < delta < 1:
            raise UserError(f"delta must be in (0, 1), got {delta!r}; use one well below 1 / (dataset size).")
        self._warn_large_delta(delta)
        if not self.accountant.history:  # Opacus' PRV accountant fails on an empty history
            return 0.0
        with _quiet_accountant():
            return self.accountant.get_epsilon(delta=delta)

    def _warn_large_delta(self, delta: float) -> None:
        """Once per delta: delta >= 1 / N allows publishing a row outright, which no user means by privacy."""
        n = self.dataset_size
        if n is None or delta < 1 / n or delta in self._warned_deltas:
            return
        self._warned_deltas.add(delta)
        warnings.warn(
            f"delta = {delta:.4g} is not below 1 / N = {1 / n:.3g} (N = {n} rows): a mechanism that publishes a "
            f"random row in the clear meets (0, 1/N)-DP, so this guarantee means little. Use delta well below 1 / N, "
            f"e.g. {1 / (10 * n):.2g}.",
            PrivacyWarning,
            stacklevel=3,
        )


def _as_float(value) -> float | None:
    """`value` as a float if it is a real number (not a bool or a string), else None."""
    if isinstance(value, (bool, str, bytes)):
        return None
    try:
        return float(value)
    except (TypeError, ValueError, RuntimeError):
        return None


def _is_count(value) -> bool:
    """Whether `value` is an integer >= 1 (2.0 counts, 2.5 and True do not)."""
    number = _as_float(value)
    return number is not None and math.isfinite(number) and number.is_integer() and number >= 1


def _check_arguments(
    *,
    max_grad_norm,
    noise_multiplier,
    target_epsilon,
    target_delta,
    epochs,
    steps,
    grad_sample_mode,
    noise_multiplicity,
    distributed,
) -> None:
    """Every make_private argument a user can get wrong, checked before the model or the data loader is touched."""
    if grad_sample_mode not in GRAD_SAMPLE_MODES:
        raise UserError(f"grad_sample_mode must be one of {GRAD_SAMPLE_MODES}, got {grad_sample_mode!r}.")
    if not _is_count(noise_multiplicity):
        raise UserError(f"noise_multiplicity must be an integer >= 1 (rows per example), got {noise_multiplicity!r}.")
    if grad_sample_mode.startswith("opacus") and noise_multiplicity != 1:
        raise UserError(f"noise_multiplicity > 1 needs our engine (flash_bk or flash), not {grad_sample_mode}.")
    norm = _as_float(max_grad_norm)
    if norm is None or not (math.isfinite(norm) and norm > 0):
        raise UserError(
            f"max_grad_norm (the clipping bound C) must be a finite number > 0, got {max_grad_norm!r}; e.g. 1.0."
        )
    if (noise_multiplier is None) == (target_epsilon is None):
        raise UserError("Give exactly one of noise_multiplier or target_epsilon (with target_delta and epochs).")
    if noise_multiplier is not None:
        sigma = _as_float(noise_multiplier)
        if sigma is None or not 0 <= sigma <= MAX_NOISE_MULTIPLIER:
            raise UserError(
                f"noise_multiplier must be a finite number in [0, {MAX_NOISE_MULTIPLIER:g}], got {noise_multiplier!r}"
                "; 0 trains without privacy, about 1 is typical, or pass target_epsilon to calibrate it."
            )
    else:
        epsilon = _as_float(target_epsilon)
        if epsilon is None or not (math.isfinite(epsilon) and epsilon > 0):
            raise UserError(f"target_epsilon must be a finite number > 0, got {target_epsilon!r}; e.g. 8.")
        delta = _as_float(target_delta)
        if delta is None or not 0 < delta < 1:
            raise UserError(
                f"target_epsilon needs target_delta in (0, 1), got {target_delta!r}; use one well below "
                "1 / (dataset size), e.g. 1e-5."
            )
        if (epochs is None) == (steps is None):
            raise UserError("target_epsilon needs exactly one of epochs or steps (the length of the training).")
        for name, value in (("epochs", epochs), ("steps", steps)):
            if value is not None and not _is_count(value):
                raise UserError(f"{name} must be an integer >= 1, got {value!r}.")
    if distributed and not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        raise UserError(
            "distributed=True needs torch.distributed initialised: start with `accelerate launch` (or torchrun) "
            "and create the Accelerator (or call init_process_group) before make_private."
        )


def _warn_weak_sampling(sample_rate: float, dataset_size: int) -> None:
    """q = 1: every logical batch is the whole dataset, so the accounting has no amplification by subsampling."""
    if sample_rate >= 1:
        warnings.warn(
            f"The logical batch covers the whole dataset (sample rate q = 1, N = {dataset_size} rows): there is no "
            "privacy amplification by subsampling, so each step costs the full Gaussian mechanism. Use a logical "
            "batch smaller than the dataset (for example N / 10 or less) for a better epsilon.",
            PrivacyWarning,
            stacklevel=3,
        )


@contextlib.contextmanager
def _quiet_accountant() -> Iterator[None]:
    """Silence what Opacus' accountants say about their own numerics, which no user can act on.

    RDP: "Optimal order is the largest alpha" (its fixed grid of orders); PRV at q = 1: numpy's divide by zero in
    log(1 - q), whose -inf the accountant handles.
    """
    with warnings.catch_warnings(), np.errstate(divide="ignore"):
        warnings.filterwarnings("ignore", message="Optimal order is the largest alpha", category=UserWarning)
        yield


@contextlib.contextmanager
def _quiet_backward_hooks() -> Iterator[None]:
    """Opacus' modules' full backward hooks warn when the model's input needs no gradient, which is the normal case."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Full backward hook is firing", category=UserWarning)
        yield


def _opacus_rows_only(group_ids):
    if group_ids is not None:
        raise UserError("group_ids need our engine (grad_sample_mode flash_bk or flash); Opacus clips each row alone.")


def make_private(*, accountant: str = "prv", **kwargs) -> tuple[nn.Module, DPOptimizer, DPCriterion, DataLoader]:
    """`PrivacyEngine(accountant).make_private(**kwargs)`; the engine is `optimizer.privacy_engine`."""
    return PrivacyEngine(accountant=accountant).make_private(**kwargs)
