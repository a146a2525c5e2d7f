"""nn.Linear: per-example norms by the ghost norm or by instantiation, whichever is cheaper.

For one example with inputs A (T, d) and output gradients G (T, p), the weight gradient is G^T A and
    ||G^T A||_F^2 = <A A^T, G G^T>          (ghost norm, Li et al. 2022; cost T^2 (d + p))
which avoids the (p, d) matrix when T (d + p) < d p. Calls of a reused module and rows of one example are
concatenated along T, so the norm is that of the summed gradient, cross terms included.
"""

from __future__ import annotations

import torch
from torch import nn

from ..groups import RowGroups, upcast


def matmul_norm_sq(a: torch.Tensor, g: torch.Tensor, groups: RowGroups) -> torch.Tensor:
    """Per-example ||sum of g_b^T a_b over the example's rows||_F^2, a (B, T, d), g (B, T, p)."""
    g = upcast(groups.tokens(g))  # (E, K*T, p)
    tokens, d, p = g.shape[1], a.shape[-1], g.shape[-1]
    if tokens * (d + p) < d * p:
        # <A A^T, G G^T> by vecdot, not a (1, T^2) @ (T^2, 1) bmm, which is 15x slower on CPU
        return torch.linalg.vecdot(groups.gram(a).flatten(1), (g @ g.mT).flatten(1))
    return torch.einsum("etp,etd->epd", g, upcast(groups.tokens(a))).pow(2).sum((1, 2))  # (E, p, d) grads


def matmul_sum(a: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """sum_b g_b^T a_b for a (B, T, d), g (B, T, p): one (p, d) matmul over all rows and tokens."""
    dtype = torch.promote_types(a.dtype, g.dtype)
    return g.flatten(0, 1).to(dtype).mT @ a.flatten(0, 1).to(dtype)


def bias_sum(g: torch.Tensor) -> torch.Tensor:
    """sum_b sum_t g_b,t for g (B, T, p), in at least fp32."""
    return upcast(g).sum((0, 1))


def tokens_of(calls: list[tuple[torch.Tensor, torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Inputs and output gradients of all calls as (B, T_total, d) and (B, T_total, p)."""
    a = [x.reshape(x.shape[0], -1, x.shape[-1]) for x, _ in calls]
    g = [y.reshape(y.shape[0], -1, y.shape[-1]) for _, y in calls]
    return (a[0], g[0]) if len(calls) == 1 else (torch.cat(a, 1), torch.cat(g, 1))


def linear_norm_sq(module: nn.Linear, calls: list, groups: RowGroups) -> torch.Tensor:
    a, g = tokens_of(calls)
    return weight_and_bias_norm_sq(module, a, g, groups)


def weight_and_bias_norm_sq(module: nn.Module, a: torch.Tensor, g: torch.Tensor, groups: RowGroups) -> torch.Tensor:
    """Per-example squared norms of the trainable weight (g^T a) and bias (sum of g), a (B, T, d), g (B, T, p)."""
    norm_sq = matmul_norm_sq(a, g, groups) if module.weight.requires_grad else 0
    if module.bias is not None and module.bias.requires_grad:
        norm_sq = norm_sq + upcast(groups.tokens(g)).sum(1).pow(2).sum(1)  # ||sum_t g_t||^2
    return norm_sq


def linear_summed_grads(module: nn.Linear, calls: list) -> dict[str, torch.Tensor]:
    a, g = tokens_of(calls)
    grads = {}
    if module.weight.requires_grad:
        grads["weight"] = matmul_sum(a, g)
    if module.bias is not None and module.bias.requires_grad:
        grads["bias"] = bias_sum(g)
    return grads
