"""The learned-variance half of DiT's output stays the checkpoint's: its rows are not trained by DP-SGD.

DiT with learn_sigma predicts 2C channels, noise then variance; we train on the noise half only (the simple loss).
The variance rows of `proj_out_2` (and of a LoRA adapter's B on it) then get an exactly zero per-example gradient,
so they add nothing to any norm, but DP-SGD would still add noise to them: a random walk of the variance
prediction. Those rows are fixed instead: before each optimizer update their gradient (noise included) is zeroed,
so Adam's moments for them stay zero, and after it their values are put back, so decoupled weight decay does not
shrink them either. The noise drawn for them is discarded, which is post-processing of the noisy release: the
guarantee is unchanged, and the noise of every other coordinate is the same as if they were not parameters.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


@dataclass(eq=False)
class FixedRows:
    """Rows of a parameter kept at their values (first dimension = output features)."""

    param: nn.Parameter
    rows: torch.Tensor  # (R,) row indices
    values: torch.Tensor  # (R, ...) their values when the run started

    def numel(self) -> int:
        return self.values.numel()


def variance_row_indices(patch_size: int, out_channels: int, channels: int) -> torch.Tensor:
    """Rows of proj_out_2's output that carry channels >= `channels`: unpatchify reads them as (p, q, c), c last."""
    return torch.arange(patch_size * patch_size * out_channels).view(-1, out_channels)[:, channels:].flatten()


def _output_layers(head: nn.Module) -> list[nn.Linear]:
    """The linear layers whose outputs add up to the head's output: the head, or peft LoRA's base and B layers."""
    if isinstance(head, nn.Linear):
        return [head]
    return [head.get_base_layer(), *head.lora_B.values()]  # W x + scale B (A x)


def variance_rows(model: nn.Module, channels: int) -> list[FixedRows]:
    """The trainable rows of DiT's final projection that predict the variance (empty without learn_sigma)."""
    config = model.config
    if config.out_channels == channels:
        return []
    rows = variance_row_indices(config.patch_size, config.out_channels, channels)
    fixed = []
    head = model.proj_out_2 if hasattr(model, "proj_out_2") else model.proj_out  # DiT's, PixArt's
    for layer in _output_layers(head):
        for param in (layer.weight, layer.bias):
            if param is not None and param.requires_grad:
                index = rows.to(param.device)
                fixed.append(FixedRows(param, index, param.detach()[index].clone()))
    return fixed


def keep_rows_fixed(optimizer: torch.optim.Optimizer, fixed: list[FixedRows]) -> None:
    """Hooks on the optimizer that applies the update (for a DP optimizer: the one it wraps, after the noise)."""
    if not fixed:
        return

    def zero_gradients(optimizer, args, kwargs) -> None:
        for f in fixed:
            if f.param.grad is not None:
                f.param.grad[f.rows] = 0

    @torch.no_grad()
    def restore_values(optimizer, args, kwargs) -> None:
        for f in fixed:
            f.param[f.rows] = f.values

    optimizer.register_step_pre_hook(zero_gradients)
    optimizer.register_step_post_hook(restore_values)
