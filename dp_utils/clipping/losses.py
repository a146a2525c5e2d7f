"""Per-example losses and the criterion wrapper whose `backward()` clips per example."""

from __future__ import annotations

from collections.abc import Callable

import torch
from diffusers.utils import BaseOutput

from ..errors import UserError
from .precision import accumulation_dtype


def per_sample_mse(prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean squared error of each example over all its elements: (B, ...) -> (B,), in at least fp32."""
    if prediction.shape != target.shape:
        raise ValueError(
            f"prediction {tuple(prediction.shape)} and target {tuple(target.shape)} differ in shape; for DiT with "
            "learned variance, compare the first in_channels output channels: output[:, :C]."
        )
    dtype = accumulation_dtype(prediction.dtype)  # bf16/fp16 outputs: reduce in fp32
    return (prediction.to(dtype) - target.to(dtype)).pow(2).flatten(1).mean(1)


per_sample_mse.reduction = "mean"  # the attribute Opacus users set on criteria for fast gradient clipping


class DPLoss:
    """Per-row losses (B,), zero on padding rows; `backward()` leaves the sum of clipped per-example gradients in
    `.grad`."""

    def __init__(self, losses: torch.Tensor, backward: Callable[[], None], mask: torch.Tensor | None = None):
        self.losses = losses
        self.mask = mask
        self._backward = backward

    def backward(self) -> None:
        if not self.losses.requires_grad:
            raise UserError(
                "The criterion's losses do not depend on the model's parameters (detached, or computed outside "
                "autograd): compute them from the prediction with torch ops, so that each example's gradient is "
                "clipped."
            )
        self._backward()

    def detach(self) -> torch.Tensor:
        return self.losses.detach()

    def item(self) -> float:
        """Mean loss over the real rows, for logging (a host sync)."""
        if self.mask is None:
            return self.losses.detach().mean().item()
        return (self.losses.detach().sum() / self.mask.sum().clamp(min=1)).item()


class DPCriterion:
    """Wraps a per-example criterion; calling it checks the (B,) shape and returns a DPLoss."""

    def __init__(
        self,
        criterion: Callable[..., torch.Tensor],
        backward: Callable[..., None],
        mark_output: Callable[[torch.Tensor], torch.Tensor] | None = None,
        mask_required: bool = False,
    ):
        self.criterion = criterion
        self._backward = backward
        self._mark_output = mark_output  # the engine's: tells it whether this forward's graph is still alive
        self.mask_required = mask_required  # the loader pads: a padding row trained on breaks the accounting

    def __call__(
        self,
        prediction: torch.Tensor,
        *args,
        group_ids: torch.Tensor | None = None,
        mask: torch.Tensor | None = None,
        **kwargs,
    ) -> DPLoss:
        """`mask` (B,) bool marks the real rows of a padded physical batch: a padding row's prediction, targets and
        loss are replaced by zeros (selected, not multiplied: NaN in it stays out), and the engine drops its pairs."""
        if isinstance(prediction, BaseOutput):  # a diffusers model output: its `.sample`
            prediction = prediction[0]
        if not isinstance(prediction, torch.Tensor):
            raise UserError(
                "The criterion's first argument must be the model's prediction, a tensor with the batch first (or a "
                f"diffusers output), got {type(prediction).__name__}."
            )
        rows = prediction.shape[0]
        if mask is None and self.mask_required:
            raise UserError(
                "The data loader pads every physical batch to max_physical_batch_size rows: pass its mask, "
                "criterion(prediction, target, mask=mask), or the padding rows train and the privacy guarantee "
                "does not hold (how many there are depends on the Poisson draw)."
            )
        if self._mark_output is not None:
            prediction = self._mark_output(prediction)
        if mask is not None:
            mask = _checked_mask(mask, rows, prediction.device)
            prediction = _select_rows(mask, prediction)
            args = tuple(_select_rows(mask, a) if _is_rows(a, rows) else a for a in args)
            kwargs = {k: _select_rows(mask, v) if _is_rows(v, rows) else v for k, v in kwargs.items()}
        losses = self.criterion(prediction, *args, **kwargs)
        if not isinstance(losses, torch.Tensor) or losses.shape != (rows,):
            got = tuple(losses.shape) if isinstance(losses, torch.Tensor) else type(losses).__name__
            raise UserError(
                f"The criterion must return one loss per example, shape ({rows},), but returned {got}. "
                "Reduce over every dimension but the batch, e.g. "
                "`F.mse_loss(pred, target, reduction='none').flatten(1).mean(1)`, or use dp_utils.per_sample_mse."
            )
        if mask is not None:
            losses = torch.where(mask, losses, torch.zeros((), dtype=losses.dtype, device=losses.device))
        return DPLoss(losses, lambda: self._backward(losses, group_ids, mask), mask)


def _checked_mask(mask: torch.Tensor, rows: int, device: torch.device) -> torch.Tensor:
    if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool or mask.shape != (rows,):
        got = f"{mask.dtype} {tuple(mask.shape)}" if isinstance(mask, torch.Tensor) else type(mask).__name__
        raise UserError(f"mask must be a bool tensor of shape ({rows},), True for a real row; got {got}.")
    return mask.to(device, non_blocking=True)


def _is_rows(x: object, rows: int) -> bool:
    return isinstance(x, torch.Tensor) and x.dim() > 0 and x.shape[0] == rows and x.is_floating_point()


def _select_rows(mask: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """x on real rows, zeros on padding rows."""
    return torch.where(mask.view(-1, *[1] * (x.dim() - 1)), x, torch.zeros((), dtype=x.dtype, device=x.device))
