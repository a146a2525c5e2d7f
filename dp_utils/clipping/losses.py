"""Per-example losses and the criterion wrapper whose `backward()` clips per example."""

from __future__ import annotations

from collections.abc import Callable

import torch
from diffusers.utils import BaseOutput

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
    """Per-row losses (B,); `backward()` leaves the sum of clipped per-example gradients in `.grad`."""

    def __init__(self, losses: torch.Tensor, backward: Callable[[], None]):
        self.losses = losses
        self._backward = backward

    def backward(self) -> None:
        self._backward()

    def detach(self) -> torch.Tensor:
        return self.losses.detach()

    def item(self) -> float:
        """Mean loss over the rows, for logging."""
        return self.losses.detach().mean().item()


class DPCriterion:
    """Wraps a per-example criterion; calling it checks the (B,) shape and returns a DPLoss."""

    def __init__(self, criterion: Callable[..., torch.Tensor], backward: Callable[[torch.Tensor, object], None]):
        self.criterion = criterion
        self._backward = backward

    def __call__(self, prediction: torch.Tensor, *args, group_ids: torch.Tensor | None = None, **kwargs) -> DPLoss:
        if isinstance(prediction, BaseOutput):  # a diffusers model output: its `.sample`
            prediction = prediction[0]
        losses = self.criterion(prediction, *args, **kwargs)
        rows = prediction.shape[0]
        if not isinstance(losses, torch.Tensor) or losses.shape != (rows,):
            got = tuple(losses.shape) if isinstance(losses, torch.Tensor) else type(losses).__name__
            raise ValueError(
                f"The criterion must return one loss per example, shape ({rows},), but returned {got}. "
                "Reduce over every dimension but the batch, e.g. "
                "`F.mse_loss(pred, target, reduction='none').flatten(1).mean(1)`, or use dp_utils.per_sample_mse."
            )
        return DPLoss(losses, lambda: self._backward(losses, group_ids))
