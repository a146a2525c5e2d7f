"""nn.Linear: per-example norms by the ghost norm or by instantiation, whichever is cheaper.

For one example with inputs A (T, d) and output gradients G (T, p), the weight gradient is G^T A and
    ||G^T A||_F^2 = <A A^T, G G^T>          (ghost norm, Li et al. 2022; cost T^2 (d + p))
which avoids the (p, d) matrix when T (d + p) < d p. Calls of a reused module and rows of one example are
concatenated along T, so the norm is that of the summed gradient, cross terms included.
"""

from __future__ import annotations

import torch
from torch import nn

from ..groups import RowGroups


def upcast(x: torch.Tensor) -> torch.Tensor:
    """Norms accumulate in at least fp32, also under bf16/fp16 autocast."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


def matmul_norm_sq(a: torch.Tensor, g: torch.Tensor, with_bias: bool = False) -> torch.Tensor:
    """Per-example ||g_e^T a_e||_F^2 (+ ||sum_t g_e,t||^2 with_bias) for a (E, T, d), g (E, T, p), in >= fp32.

    The bias is a weight column fed with ones, so in the ghost form it costs only a 1 added to the input Gram.
    """
    a, g = upcast(a), upcast(g)
    examples, tokens, d, p = a.shape[0], a.shape[1], a.shape[2], g.shape[2]
    if tokens * (d + p) < d * p:
        a_gram, g_gram = a @ a.mT, g @ g.mT  # (E, T, T)
        if with_bias:
            a_gram += 1
        # <A A^T, G G^T>; vecdot, not a (1, T^2) @ (T^2, 1) bmm, which is 15x slower on CPU
        return torch.linalg.vecdot(a_gram.view(examples, -1), g_gram.view(examples, -1))
    norm_sq = torch.einsum("etp,etd->epd", g, a).pow(2).sum((1, 2))  # (E, p, d) per-example gradients
    return norm_sq + g.sum(1).pow(2).sum(1) if with_bias else norm_sq


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
    return weight_and_bias_norm_sq(module, groups.tokens(a), groups.tokens(g))


def weight_and_bias_norm_sq(module: nn.Module, a: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """Squared norms of the trainable weight (g^T a) and bias (sum of g) of a linear map, a (E, T, d), g (E, T, p)."""
    with_bias = module.bias is not None and module.bias.requires_grad
    if module.weight.requires_grad:
        return matmul_norm_sq(a, g, with_bias)
    return upcast(g).sum(1).pow(2).sum(1) if with_bias else 0


def linear_summed_grads(module: nn.Linear, calls: list) -> dict[str, torch.Tensor]:
    a, g = tokens_of(calls)
    grads = {}
    if module.weight.requires_grad:
        grads["weight"] = matmul_sum(a, g)
    if module.bias is not None and module.bias.requires_grad:
        grads["bias"] = bias_sum(g)
    return grads
