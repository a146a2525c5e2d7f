"""nn.Conv2d (DiT's patch embedding): unfold into a linear layer over patches, then the linear rule."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..groups import RowGroups
from ..precision import NormTerms
from .linear import concat_calls, weight_and_bias_norm, weight_and_bias_sums


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
    return concat_calls(a), concat_calls(g)


def conv2d_norm(module: nn.Conv2d, calls: list, groups: RowGroups) -> NormTerms:
    return weight_and_bias_norm(module, *_patches(module, calls), groups)


def conv2d_summed_grads(module: nn.Conv2d, calls: list) -> dict[str, torch.Tensor]:
    return weight_and_bias_sums(module, *_patches(module, calls))
