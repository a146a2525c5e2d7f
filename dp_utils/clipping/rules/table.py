"""A bare parameter added to a per-example tensor by broadcasting (`dp_utils.clipping.tables` captures it).

Each call is (G, G) with G (B, ..., *table.shape) the gradient of one `table[None] + x`: example b's gradient of the
table is G_b summed over the broadcast dimensions, like a bias' (sum over positions of the output gradient).
"""

from __future__ import annotations

import torch
from torch import nn

from ..groups import RowGroups
from ..precision import NormTerms, square_sums, unit_roundoff, upcast

TABLE = "scale_shift_table"


def table_unsupported(module: nn.Module) -> str | None:
    return None if isinstance(getattr(module, TABLE, None), nn.Parameter) else f"no parameter '{TABLE}'"


def _row_grads(module: nn.Module, calls: list) -> torch.Tensor:
    """(B, *table.shape): each row's gradient of the table, summed over calls and broadcast dimensions."""
    shape = getattr(module, TABLE).shape
    total = None
    for _, g in calls:
        rows = upcast(g).sum_to_size(g.shape[0], *[1] * (g.dim() - 1 - len(shape)), *shape).reshape(-1, *shape)
        total = rows if total is None else total + rows
    return total


def table_norm(module: nn.Module, calls: list, groups: RowGroups) -> NormTerms:
    terms = NormTerms(square_sums(groups.sum_rows(_row_grads(module, calls))))
    u = unit_roundoff(calls[0][1].dtype)
    if u:  # an element sums n rounded c * g of its example: ||error|| <= u sqrt(n) ||G_e||
        table_size = getattr(module, TABLE).numel()
        summed = sum(g[0].numel() for _, g in calls) * groups.max_rows / table_size
        grad_sq = sum(square_sums(groups.rows_end_to_end(g.flatten(1).unsqueeze(-1))) for _, g in calls)
        terms.scaling_error_sq = u**2 * grad_sq * summed
    return terms


def table_summed_grads(module: nn.Module, calls: list) -> dict[str, torch.Tensor]:
    return {TABLE: _row_grads(module, calls).sum(0)}
