"""nn.Embedding: ghost norm over tokens that hit the same row of the table.

Example e's gradient puts sum_{t: idx_t = v} g_t in row v, so ||grad||^2 = sum_{s,t} [idx_s = idx_t] <g_s, g_t>.
"""

from __future__ import annotations

import torch
from torch import nn

from ..groups import RowGroups
from ..precision import NormTerms, matmul, relative_bound, square_sums, unit_roundoff, upcast
from .linear import concat_calls


def embedding_unsupported(module: nn.Embedding) -> str | None:
    return "sparse=True" if module.sparse else None


def _indices_and_grads(module: nn.Embedding, calls: list) -> tuple[torch.Tensor, torch.Tensor]:
    """Indices (B, T) and output gradients (B, T, p), calls concatenated; padding tokens get no gradient."""
    idx = concat_calls([x.reshape(x.shape[0], -1) for x, _ in calls])
    g = concat_calls([y.reshape(y.shape[0], -1, y.shape[-1]) for _, y in calls])
    if module.padding_idx is not None:
        g = g * (idx != module.padding_idx).unsqueeze(-1).to(g.dtype)
    return idx, g


def embedding_norm(module: nn.Embedding, calls: list, groups: RowGroups) -> NormTerms:
    idx, g = _indices_and_grads(module, calls)
    idx, g = groups.rows_end_to_end(idx), groups.rows_end_to_end(g)
    same_row = idx.unsqueeze(2) == idx.unsqueeze(1)  # (E, T, T)
    gram, err = matmul(g, g.mT)
    terms = NormTerms((gram * same_row).sum((1, 2)))
    if err:
        terms.norm_sq_error = relative_bound(err, err) * (gram.abs() * same_row).sum((1, 2))
    u = unit_roundoff(g.dtype)
    if u:  # a row's gradient sums at most T rounded c * g_t: ||error|| <= u sqrt(T) ||G||
        terms.scaling_error_sq = u**2 * square_sums(g) * g.shape[1]
    return terms


def embedding_summed_grads(module: nn.Embedding, calls: list) -> dict[str, torch.Tensor]:
    idx, g = _indices_and_grads(module, calls)
    g = upcast(g)
    grad = torch.zeros(module.weight.shape, dtype=g.dtype, device=g.device)
    return {"weight": grad.index_add_(0, idx.flatten(), g.flatten(0, 1))}


def embedding_stacked_add_(module: nn.Embedding, a: torch.Tensor, g: torch.Tensor, blocks: dict) -> None:
    """blocks["weight"][l] += table l's summed gradient, for L tables shaped like `module` whose calls are stacked
    along the rows: one index_add into the (L * V, D) block, table l's indices shifted by l * V."""
    idx, g = _indices_and_grads(module, [(a, g)])
    block = blocks["weight"]
    copies, rows, width = block.shape
    shift = torch.arange(copies, device=idx.device).repeat_interleave(idx.shape[0] // copies) * rows
    block.view(copies * rows, width).index_add_(0, (idx + shift[:, None]).flatten(), g.flatten(0, 1).to(block.dtype))
