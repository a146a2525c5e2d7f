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
import numbers
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
    DPOptimizerFastGradientClipping,
)
from opacus.optimizers import DPOptimizer as OpacusDPOptimizer
from opacus.utils.fast_gradient_clipping_utils import DPTensorFastGradientClipping
from torch import nn
from torch.utils.data import DataLoader

from ..clipping.engine import MODES, ClippingEngine
from ..clipping.groups import RowGroups
from ..clipping.losses import DPCriterion, per_sample_mse
from ..errors import UserError
from .cuda_graphs import check_cuda_graphs
from .optimizer import DPOptimizer
from .physical_batches import PhysicalBatchLoader
from .randomness import generator_from_entropy, secret_seed, shared_secret_seed
from .sampling import loading_options, poisson_data_loader

GRAD_SAMPLE_MODES = (*MODES, "opacus_ghost", "opacus_hooks")


ACCOUNTANTS = ("prv", "rdp", "gdp")  # Opacus' accountant registry
MAX_NOISE_MULTIPLIER = 1e6  # Opacus' calibration gives up above it; the accountants overflow far above it
# Opacus' PRV accountant: 0.2 s per epsilon at 0.5, 1.6 s at 0.3, 4.9 s at 0.2, minutes at 0.1 (q = 0.01, 1000 steps)
MIN_PRV_NOISE_MULTIPLIER = 0.2
PRV_CALIBRATION_FLOOR = 20 / 64  # the last point of Opacus' bisection (from 20) above MIN_PRV_NOISE_MULTIPLIER


class PrivacyWarning(UserWarning):
    """A run that is valid but whose guarantee is weaker than its user may think."""


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
        max_grad_norm: float,
        data_loader: DataLoader | None = None,
        sample_rate: float | None = None,
        dataset_size: int | None = None,
        criterion=per_sample_mse,
        noise_multiplier: float | None = None,
        target_epsilon: float | None = None,
        target_delta: float | None = None,
        epochs: int | None = None,
        steps: int | None = None,
        grad_sample_mode: str = "flash_bk",
        poisson_sampling: bool = True,
        max_physical_batch_size: int | None = None,
        noise_multiplicity: int = 1,
        distributed: bool = False,
        noise_generator: torch.Generator | None = None,
        sampling_seed: int | None = None,
        cuda_graphs: bool = False,
    ) -> tuple[nn.Module, torch.optim.Optimizer, DPCriterion, DataLoader | PhysicalBatchLoader | None]:
        """Returns (module, optimizer, criterion, data_loader) ready for DP-SGD.

        `criterion(output, target)` gives per-example losses (B,); the returned wrapper's `backward()` clips each
        example's gradient to `max_grad_norm`. `noise_multiplicity=K`: every example is K consecutive rows, clipped
        as one (or pass `group_ids=` to the criterion). `distributed=True` (one process per rank, no DDP wrapper):
        each rank samples its share of the Poisson batch with `sampling_seed`, and the noise is added once in total.
        Sampling: q is `sample_rate` or Opacus' 1 / len(data_loader), N is `dataset_size` or the loader's dataset
        size, and the noisy sum is divided by q N; a caller that samples its own batches passes both and no loader.
        `max_physical_batch_size=P`: the loader yields each logical batch as `(batch, mask)` physical batches of
        exactly P rows (N if fewer; padding rows zero, False in the mask); pass `mask=` to the criterion and step
        after each (the optimizer steps after a logical batch's last). `cuda_graphs=True` captures the noisy step
        after a few eager ones; wrap the physical step in `dp_utils.CudaGraphedStep` to capture it too.

        Noise and batches come from the OS's entropy unless `noise_generator` / `sampling_seed` are given: keep
        those as secret as the data. Input contract (what the accounting assumes): every layer sees the batch
        first, one forward per backward, an example at most once per logical batch. Bad arguments raise
        `UserError` before the model or the loader is touched; q = 1 or target_delta >= 1 / N warn.
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
            noise_generator=noise_generator,
            sampling_seed=sampling_seed,
        )
        _check_physical_batch_size(max_physical_batch_size, data_loader)
        sample_rate, self.dataset_size = _sampling_of(data_loader, sample_rate, dataset_size)
        _warn_weak_sampling(sample_rate, self.dataset_size)
        if data_loader is not None and not poisson_sampling:
            _warn_unchecked_rate(sample_rate, data_loader)
        if target_delta is not None:
            self._warn_large_delta(target_delta)
        noise_multiplier = self._noise_multiplier(
            noise_multiplier, target_epsilon, target_delta, sample_rate, epochs, steps
        )
        if cuda_graphs:
            check_cuda_graphs(module, grad_sample_mode, noise_generator)
        if noise_generator is None:
            device = next((p.device for p in module.parameters()), torch.device("cpu"))
            noise_generator = generator_from_entropy(secret_seed(), device)
        world_size = torch.distributed.get_world_size() if distributed else 1
        dp = dict(
            noise_multiplier=float(noise_multiplier),
            max_grad_norm=float(max_grad_norm),
            expected_batch_size=sample_rate * self.dataset_size / world_size,  # per rank, as Opacus counts it
            generator=noise_generator,
            secure_mode=self.secure_mode,
        )
        module, optimizer = self._wrap(module, optimizer, grad_sample_mode, dp, distributed, sample_rate)
        optimizer.privacy_engine = self
        optimizer.sample_rate = sample_rate
        if cuda_graphs:
            optimizer.use_cuda_graphs()
        if data_loader is not None and poisson_sampling:
            data_loader = _poisson_loader(data_loader, sample_rate, distributed, sampling_seed)
        if max_physical_batch_size is not None:
            # a batch never holds more than N rows: rows past N would only ever be padding
            size = min(int(max_physical_batch_size), self.dataset_size)
            data_loader = PhysicalBatchLoader(data_loader, size, optimizer)
        backward = self._backward_for(grad_sample_mode, module, optimizer, int(noise_multiplicity))
        mark_output = self.clipping_engine.mark_output if grad_sample_mode in MODES else None
        criterion = DPCriterion(criterion, backward, mark_output, mask_required=max_physical_batch_size is not None)
        return module, optimizer, criterion, data_loader

    def _noise_multiplier(self, noise_multiplier, target_epsilon, target_delta, sample_rate, epochs, steps) -> float:
        """The given sigma, or Opacus' calibration to the target; one the PRV accountant cannot serve is refused."""
        if target_epsilon is not None:
            steps = steps if steps is not None else int(epochs / sample_rate)
            return self._calibrate(target_epsilon, target_delta, sample_rate, steps)
        if 0 < noise_multiplier < MIN_PRV_NOISE_MULTIPLIER and self.accountant.mechanism() == "prv":
            raise UserError(
                f"noise_multiplier = {noise_multiplier} is below {MIN_PRV_NOISE_MULTIPLIER}, where the PRV accountant "
                "takes minutes per epsilon (and the guarantee means little): use accountant 'rdp' (--accountant rdp) "
                "or more noise."
            )
        return noise_multiplier

    def _wrap(
        self,
        module: nn.Module,
        optimizer: torch.optim.Optimizer,
        grad_sample_mode: str,
        dp: dict,
        distributed: bool,
        sample_rate: float,
    ) -> tuple[nn.Module, torch.optim.Optimizer]:
        """The module and optimizer of each mode, with the accountant's hook: our engine and DP optimizer, or Opacus'
        for its reference modes."""
        if grad_sample_mode in MODES:
            self.clipping_engine = ClippingEngine(module, dp["max_grad_norm"], grad_sample_mode)
            rank_and_size = (
                dict(rank=torch.distributed.get_rank(), world_size=torch.distributed.get_world_size())
                if distributed
                else {}
            )
            optimizer = DPOptimizer(optimizer, clipping_engine=self.clipping_engine, **dp, **rank_and_size)
            optimizer.attach_step_hook(
                lambda step: self.accountant.step(noise_multiplier=step.noise_multiplier, sample_rate=sample_rate)
            )
            return module, optimizer
        if grad_sample_mode == "opacus_ghost":
            module = GradSampleModuleFastGradientClipping(
                module, max_grad_norm=dp["max_grad_norm"], loss_reduction="mean"
            )
            optimizer_class = (
                DistributedDPOptimizerFastGradientClipping if distributed else DPOptimizerFastGradientClipping
            )
        else:
            module = GradSampleModule(module, loss_reduction="mean")
            optimizer_class = DistributedDPOptimizer if distributed else OpacusDPOptimizer
        optimizer = optimizer_class(optimizer, loss_reduction="mean", **dp)
        optimizer.attach_step_hook(self.accountant.get_optimizer_hook_fn(sample_rate=sample_rate))
        return module, optimizer

    def _backward_for(self, grad_sample_mode: str, module: nn.Module, optimizer: DPOptimizer, multiplicity: int):
        """The backward of per-row losses (B,) in each mode."""
        if grad_sample_mode in MODES:
            engine = self.clipping_engine

            def backward(losses, group_ids, mask):
                engine.backward(losses, RowGroups(group_ids, len(losses), multiplicity), mask)

        elif grad_sample_mode == "opacus_ghost":

            def backward(losses, group_ids, mask):
                _opacus_rows_only(group_ids)
                with _quiet_backward_hooks():
                    DPTensorFastGradientClipping(module, optimizer, losses, loss_reduction="mean").backward()

        else:

            def backward(losses, group_ids, mask):
                _opacus_rows_only(group_ids)
                with _quiet_backward_hooks():
                    losses.mean().backward()

        return backward

    def _calibrate(self, target_epsilon: float, target_delta: float, sample_rate: float, steps: int) -> float:
        """Opacus' noise calibration; a budget it cannot reach is the user's to change, so a UserError says how.

        Opacus bisects from 0 on the points 20 / 2^k; its PRV accountant takes minutes per epsilon below a noise
        multiplier of about 0.2, so a budget whose bisection would go below 20 / 64 is refused first.
        """
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
    noise_generator,
    sampling_seed,
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
    if noise_generator is not None and not isinstance(noise_generator, torch.Generator):
        raise UserError(
            f"noise_generator must be a torch.Generator (kept as secret as the data), got "
            f"{type(noise_generator).__name__}; leave it out to draw the noise from the OS's entropy."
        )
    is_seed = isinstance(sampling_seed, numbers.Integral) and not isinstance(sampling_seed, bool)
    if sampling_seed is not None and not (is_seed and sampling_seed >= 0):
        raise UserError(
            f"sampling_seed must be an integer >= 0 (kept as secret as the data), got {sampling_seed!r}; leave it "
            "out to draw the batches from the OS's entropy."
        )
    if distributed and not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        raise UserError(
            "distributed=True needs torch.distributed initialised: start with `accelerate launch` (or torchrun) "
            "and create the Accelerator (or call init_process_group) before make_private."
        )


def _sampling_of(data_loader: DataLoader | None, sample_rate, dataset_size) -> tuple[float, int]:
    """(q, N) from the arguments, or from the loader as Opacus derives them (q = 1 / len(loader))."""
    if data_loader is None:
        if sample_rate is None or dataset_size is None:
            raise UserError("Pass a data_loader, or both sample_rate and dataset_size (for batches you sample).")
    elif dataset_size is not None and dataset_size != len(data_loader.dataset):
        raise UserError(
            f"dataset_size = {dataset_size} differs from the loader's dataset ({len(data_loader.dataset)} rows): "
            "give one of them."
        )
    if dataset_size is None:
        dataset_size = len(data_loader.dataset)
        if dataset_size == 0 or len(data_loader) == 0:
            raise UserError("The data loader is empty: DP-SGD needs a dataset with at least one row.")
    if not _is_count(dataset_size):
        raise UserError(f"dataset_size must be an integer >= 1 (rows in the private dataset), got {dataset_size!r}.")
    if sample_rate is None:
        sample_rate = 1 / len(data_loader)
    rate = _as_float(sample_rate)
    if rate is None or not 0 < rate <= 1:
        raise UserError(f"sample_rate must be a number in (0, 1] (the Poisson sampling rate q), got {sample_rate!r}.")
    return rate, int(dataset_size)


def _check_physical_batch_size(size, data_loader: DataLoader | None) -> None:
    if size is None:
        return
    if not _is_count(size):
        raise UserError(f"max_physical_batch_size must be an integer >= 1 (rows per physical batch), got {size!r}.")
    if data_loader is None:
        raise UserError("max_physical_batch_size splits the data_loader's batches: pass a data_loader.")


def _poisson_loader(data_loader: DataLoader, sample_rate: float, distributed: bool, sampling_seed) -> DataLoader:
    """Poisson sampling at rate q: Opacus' DPDataLoader in one process, our lock-step sampler across processes."""
    if distributed:
        seed = shared_secret_seed() if sampling_seed is None else sampling_seed
        return poisson_data_loader(data_loader, seed=seed, distributed=True, sample_rate=sample_rate)
    entropy = secret_seed() if sampling_seed is None else sampling_seed
    return DPDataLoader(
        data_loader.dataset,
        sample_rate=sample_rate,
        collate_fn=data_loader.collate_fn,
        generator=generator_from_entropy(entropy),
        **loading_options(data_loader),
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


def _warn_unchecked_rate(sample_rate: float, data_loader: DataLoader) -> None:
    """poisson_sampling=False: the loader's own batches are used, and the accountant is told q; warn if they differ."""
    loader_rate = 1 / len(data_loader)
    if not math.isclose(sample_rate, loader_rate, rel_tol=1e-6):
        warnings.warn(
            f"sample_rate = {sample_rate:.6g} is accounted, but with poisson_sampling=False the loader's own batches "
            f"train: {len(data_loader)} per epoch (rate {loader_rate:.6g}). The guarantee holds only if the loader "
            "samples each row independently at that rate; otherwise leave poisson_sampling on or sample_rate out.",
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
    """Opacus clips each row alone. (A mask works: the criterion zeroes a padding row's loss, so its per-sample
    gradient is zero as long as its values are finite, which the zero rows of physical batches are.)"""
    if group_ids is not None:
        raise UserError("group_ids need our engine (grad_sample_mode flash_bk or flash); Opacus clips each row alone.")


def make_private(*, accountant: str = "prv", **kwargs) -> tuple:
    """`PrivacyEngine(accountant).make_private(**kwargs)`; the engine is `optimizer.privacy_engine`."""
    return PrivacyEngine(accountant=accountant).make_private(**kwargs)
