"""make_private: the Opacus flow (sampler, DP optimizer, accountant) around our clipping engine.

Noise, scaling and accounting are Opacus' own: the fast-gradient-clipping optimizers (they read the clipped sum
from `.grad`, add N(0, sigma^2 C^2) once per logical batch, divide by the expected batch size), and the RDP/PRV
accountants fed by the optimizer's step hook. Poisson sampling is Opacus' `DPDataLoader` in one process and our
lock-step `PoissonBatchSampler` across processes (Opacus' distributed sampler skips empty local batches, so ranks
can take different numbers of steps and hang in the all-reduce).
"""

from __future__ import annotations

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
from opacus.optimizers.optimizer import _check_processed_flag, _generate_noise, _mark_as_processed
from opacus.utils.fast_gradient_clipping_utils import DPTensorFastGradientClipping
from torch import nn
from torch.utils.data import DataLoader

from .engine import MODES, ClippingEngine
from .groups import RowGroups
from .losses import DPCriterion, per_sample_mse
from .noise import GaussianNoise
from .sampling import poisson_data_loader

GRAD_SAMPLE_MODES = (*MODES, "opacus_ghost", "opacus_hooks")


class _InPlaceStages:
    """Opacus' accumulate, add-noise and scale stages without their copies, for gradients that arrive clipped.

    The clipped sum is moved into `summed_grad` (a parameter without `.grad`, unused by the batch or in an empty
    Poisson batch, contributes zero), then scaled in place and noised in place, grad = sum / B + N(0, (sigma C / B)^2)
    with B the expected batch size: no new tensor per parameter and step instead of Opacus' three (copy, noise, sum).
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.gaussian_noise = GaussianNoise()

    def accumulate(self):
        for p in self.params:
            grad = p.grad if p.grad is not None else torch.zeros_like(p)
            grad.__dict__.pop("_processed", None)  # it may be the last step's sum, zeroed in place by zero_grad()
            p.summed_grad = grad if p.summed_grad is None else p.summed_grad.add_(grad)
            p.grad = None  # moved, not copied: a zero_grad between physical batches must not touch the sum

    def add_noise(self):
        scale = 1.0 / (self.expected_batch_size * self.accumulated_iterations) if self.loss_reduction == "mean" else 1
        for p in self.params:
            _check_processed_flag(p.summed_grad)
            p.grad = p.summed_grad  # the sum is ours (moved in accumulate): scaled and noised in place
            _mark_as_processed(p.summed_grad)
        grads = [p.grad for p in self.params]
        # distributed: the whole noise comes from rank 0, then the sums are reduced
        std = self.noise_multiplier * self.max_grad_norm * scale if getattr(self, "rank", 0) == 0 else 0.0
        if self.secure_mode and std > 0:
            for g in grads:
                g.mul_(scale).add_(_generate_noise(std, g, self.generator, secure_mode=True))
        else:
            self.gaussian_noise.add_(grads, std, self.generator, scale=scale)

    def scale_grad(self):
        """Done in add_noise, in the same pass."""


class FlashDPOptimizer(_InPlaceStages, DPOptimizerFastGradientClipping):
    """Opacus' noise-and-scale optimizer for gradients that arrive already clipped and summed."""


class DistributedFlashDPOptimizer(_InPlaceStages, DistributedDPOptimizerFastGradientClipping):
    """Same, across processes: noise on rank 0 only, clipped sums all-reduced."""


class PrivacyEngine:
    """Opacus-style entry point; keeps the accountant that `get_epsilon` reads."""

    def __init__(self, accountant: str = "prv", secure_mode: bool = False):
        self.accountant = create_accountant(mechanism=accountant)
        self.secure_mode = secure_mode
        self.clipping_engine: ClippingEngine | None = None

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
        on every rank (None: rank 0 draws one from torch's RNG and sends it to all), so that a resumed run can
        rebuild them (`data_loader.batch_sampler.set_step`).
        """
        if grad_sample_mode not in GRAD_SAMPLE_MODES:
            raise ValueError(f"grad_sample_mode must be one of {GRAD_SAMPLE_MODES}, got {grad_sample_mode!r}")
        if grad_sample_mode.startswith("opacus") and noise_multiplicity != 1:
            raise ValueError(f"noise_multiplicity > 1 needs our engine (flash_bk or flash), not {grad_sample_mode}.")
        if poisson_sampling and distributed:
            seed = _shared_seed() if sampling_seed is None else sampling_seed
            data_loader = poisson_data_loader(data_loader, seed=seed, distributed=True)
        elif poisson_sampling:
            data_loader = DPDataLoader.from_data_loader(data_loader)
        sample_rate = 1 / len(data_loader)
        expected_batch_size = int(len(data_loader.dataset) * sample_rate)
        if distributed:
            expected_batch_size /= torch.distributed.get_world_size()  # per rank, as Opacus does
        if (noise_multiplier is None) == (target_epsilon is None):
            raise ValueError("Give exactly one of noise_multiplier or target_epsilon (with target_delta and epochs).")
        if target_epsilon is not None:
            if target_delta is None or (epochs is None) == (steps is None):
                raise ValueError("target_epsilon needs target_delta and one of epochs or steps.")
            noise_multiplier = get_noise_multiplier(
                target_epsilon=target_epsilon,
                target_delta=target_delta,
                sample_rate=sample_rate,
                epochs=epochs,
                steps=steps,
                accountant=self.accountant.mechanism(),
            )

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
                DPTensorFastGradientClipping(module, optimizer, losses, loss_reduction="mean").backward()

        else:

            def backward(losses, group_ids):
                _opacus_rows_only(group_ids)
                losses.mean().backward()

        return backward

    def get_epsilon(self, delta: float) -> float:
        """Epsilon spent so far at this delta, by the accountant fed with every noisy step taken (0 before any)."""
        if not self.accountant.history:  # Opacus' PRV accountant fails on an empty history
            return 0.0
        return self.accountant.get_epsilon(delta=delta)


def _shared_seed() -> int:
    """A seed drawn from torch's RNG on rank 0 and sent to every rank, so that all ranks agree on the batches."""
    seed = [int(torch.randint(2**63 - 1, ()).item())]
    torch.distributed.broadcast_object_list(seed, src=0)
    return seed[0]


def _opacus_rows_only(group_ids):
    if group_ids is not None:
        raise ValueError(
            "group_ids need our engine (grad_sample_mode flash_bk or flash); Opacus clips each row alone."
        )


def make_private(*, accountant: str = "prv", **kwargs) -> tuple[nn.Module, DPOptimizer, DPCriterion, DataLoader]:
    """`PrivacyEngine(accountant).make_private(**kwargs)`; the engine is `optimizer.privacy_engine`."""
    return PrivacyEngine(accountant=accountant).make_private(**kwargs)
