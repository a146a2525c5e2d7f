"""nn.Embedding: ghost norm over tokens that hit the same row of the table.

Example e's gradient puts sum_{t: idx_t = v} g_t in row v, so ||grad||^2 = sum_{s,t} [idx_s = idx_t] <g_s, g_t>.
"""

from __future__ import annotations

import torch
from torch import nn

from ..groups import RowGroups, upcast


def embedding_unsupported(module: nn.Embedding) -> str | None:
    return "sparse=True" if module.sparse else None


def _tokens(module: nn.Embedding, calls: list) -> tuple[torch.Tensor, torch.Tensor]:
    """Indices (B, T) and output gradients (B, T, p), calls concatenated; padding tokens get no gradient."""
    idx = torch.cat([x.reshape(x.shape[0], -1) for x, _ in calls], 1)
    g = torch.cat([y.reshape(y.shape[0], -1, y.shape[-1]) for _, y in calls], 1)
    if module.padding_idx is not None:
        g = g * (idx != module.padding_idx).unsqueeze(-1).to(g.dtype)
    return idx, g


def embedding_norm_sq(module: nn.Embedding, calls: list, groups: RowGroups) -> torch.Tensor:
    if not module.weight.requires_grad:
        return 0
    idx, g = _tokens(module, calls)
    idx, g = groups.tokens(idx), upcast(groups.tokens(g))
    same_row = idx.unsqueeze(2) == idx.unsqueeze(1)  # (E, T, T)
    return ((g @ g.mT) * same_row).sum((1, 2))


def embedding_summed_grads(module: nn.Embedding, calls: list) -> dict[str, torch.Tensor]:
    if not module.weight.requires_grad:
        return {}
    idx, g = _tokens(module, calls)
    g = upcast(g)
    grad = torch.zeros(module.weight.shape, dtype=g.dtype, device=g.device)
    return {"weight": grad.index_add_(0, idx.flatten(), g.flatten(0, 1))}
