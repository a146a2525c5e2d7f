"""nn.LayerNorm, nn.GroupNorm and diffusers' RMSNorm with affine parameters: per-example gradients are small, so
instantiate them.

y = x_hat * w + b gives per-example dL/dw = sum over positions of g * x_hat and dL/db = sum of g.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..groups import RowGroups
from ..precision import NormTerms, square_sums, unit_roundoff, upcast
from .rms_norm import RMSNorm, rms_norm_row_grads


def _layer_norm_row_grads(module: nn.LayerNorm, x: torch.Tensor, g: torch.Tensor) -> dict[str, torch.Tensor]:
    x_hat = F.layer_norm(upcast(x), module.normalized_shape, eps=module.eps)
    positions = (x.shape[0], -1, *module.normalized_shape)
    return {"weight": (upcast(g) * x_hat).reshape(positions).sum(1), "bias": upcast(g).reshape(positions).sum(1)}


def _group_norm_row_grads(module: nn.GroupNorm, x: torch.Tensor, g: torch.Tensor) -> dict[str, torch.Tensor]:
    x_hat = F.group_norm(upcast(x), module.num_groups, eps=module.eps)
    return {
        "weight": (upcast(g) * x_hat).flatten(2).sum(2),  # (B, C)
        "bias": upcast(g).flatten(2).sum(2),
    }


_ROW_GRADS = {nn.LayerNorm: _layer_norm_row_grads, nn.GroupNorm: _group_norm_row_grads, RMSNorm: rms_norm_row_grads}


def _row_grads(module: nn.Module, calls: list) -> dict[str, torch.Tensor]:
    """Per-row gradients (B, *param.shape) of the trainable affine parameters, summed over calls."""
    row_grads = _ROW_GRADS[type(module)]
    total: dict[str, torch.Tensor] = {}
    for x, g in calls:
        for name, grad in row_grads(module, x, g).items():
            if getattr(module, name) is not None and getattr(module, name).requires_grad:
                total[name] = total[name] + grad if name in total else grad
    return total


def affine_norm(module: nn.Module, calls: list, groups: RowGroups) -> NormTerms:
    grads = _row_grads(module, calls)
    terms = NormTerms(sum(square_sums(groups.sum_rows(grad)) for grad in grads.values()))
    u = unit_roundoff(calls[0][1].dtype)
    if u:  # rounded c * g, summed over n elements against x_hat (||x_hat||^2 <= n) and over positions for the bias
        elements = sum(g[0].numel() for _, g in calls) * groups.max_rows
        grad_sq = sum(square_sums(groups.rows_end_to_end(g.flatten(1).unsqueeze(-1))) for _, g in calls)
        terms.scaling_error_sq = u**2 * grad_sq * 2 * elements
    return terms


def affine_summed_grads(module: nn.Module, calls: list) -> dict[str, torch.Tensor]:
    return {name: grad.sum(0) for name, grad in _row_grads(module, calls).items()}
