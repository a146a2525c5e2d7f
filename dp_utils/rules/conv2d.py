"""nn.Conv2d (DiT's patch embedding): unfold into a linear layer over patches, then the linear rule."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..groups import RowGroups
from ..precision import NormTerms
from .linear import bias_sum, matmul_sum, weight_and_bias_norm


def conv2d_unsupported(module: nn.Conv2d) -> str | None:
    if module.groups != 1:
        return "grouped convolution (groups > 1)"
    if module.padding_mode != "zeros":
        return f"padding_mode={module.padding_mode!r}"
    if isinstance(module.padding, str) and module.padding != "valid":
        return f"padding={module.padding!r}"
    return None


def _patches(module: nn.Conv2d, calls: list) -> tuple[torch.Tensor, torch.Tensor]:
    """Inputs as (B, L, C*kh*kw) patches and output gradients as (B, L, O), calls concatenated along L."""
    padding = 0 if module.padding == "valid" else module.padding
    a, g = [], []
    for x, grad_out in calls:
        cols = F.unfold(x, module.kernel_size, dilation=module.dilation, padding=padding, stride=module.stride)
        a.append(cols.mT)  # (B, L, C*kh*kw)
        g.append(grad_out.flatten(2).mT)  # (B, L, O)
    return torch.cat(a, 1), torch.cat(g, 1)


def conv2d_norm(module: nn.Conv2d, calls: list, groups: RowGroups) -> NormTerms:
    a, g = _patches(module, calls)
    return weight_and_bias_norm(module, a, g, groups)


def conv2d_summed_grads(module: nn.Conv2d, calls: list) -> dict[str, torch.Tensor]:
    a, g = _patches(module, calls)
    grads = {}
    if module.weight.requires_grad:
        grads["weight"] = matmul_sum(a, g).view_as(module.weight)
    if module.bias is not None and module.bias.requires_grad:
        grads["bias"] = bias_sum(g)
    return grads
