"""Which batch rows belong to which privacy unit (example).

Noise multiplicity feeds K noisy copies of one image through the model; the K rows are one example and must be
clipped as one: its gradient is the sum over its rows, and its norm the norm of that sum.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

import torch

from .precision import matmul

T = TypeVar("T")


class RowGroups:
    """Maps the B rows of a batch to E examples; the identity when every row is its own example."""

    def __init__(self, group_ids: torch.Tensor | None, num_rows: int, multiplicity: int = 1):
        if group_ids is not None and multiplicity != 1:
            raise ValueError("Give either group_ids or a multiplicity, not both.")
        self.num_rows = num_rows
        self._last: tuple | None = None  # (key, tensor, value) of the last shared() call
        self._contiguous = None  # K when rows i*K..i*K+K-1 form example i (no copy needed to group them)
        self._stacked: dict[int, RowGroups] = {}
        if group_ids is None:
            if num_rows % multiplicity:
                raise ValueError(
                    f"The batch has {num_rows} rows, not a multiple of the noise multiplicity {multiplicity}: "
                    f"repeat every example exactly {multiplicity} times, consecutively."
                )
            self._contiguous = multiplicity
            self.num_examples = num_rows // multiplicity
            self.row_to_example = None
            return
        group_ids = torch.as_tensor(group_ids)
        if group_ids.shape != (num_rows,):
            raise ValueError(f"group_ids must have shape ({num_rows},), one id per row; got {tuple(group_ids.shape)}.")
        unique, row_to_example = torch.unique(group_ids, return_inverse=True)
        self.num_examples = len(unique)
        self.row_to_example = row_to_example  # (B,) example index in 0..E-1
        counts = torch.bincount(row_to_example, minlength=self.num_examples)
        self._max_rows = int(counts.max()) if num_rows else 0
        # position of each row inside its example, for the padded (E, K_max, ...) layout
        order = torch.argsort(row_to_example, stable=True)
        starts = torch.cumsum(counts, 0) - counts
        position = torch.empty_like(row_to_example)
        position[order] = torch.arange(num_rows) - starts[row_to_example[order]]
        self._position = position

    @property
    def max_rows(self) -> int:
        """Rows of the largest example."""
        return self._contiguous if self._contiguous is not None else self._max_rows

    def rows_end_to_end(self, x: torch.Tensor) -> torch.Tensor:
        """(B, T, ...) -> (E, K*T, ...): an example's rows laid end to end along the token axis.

        Padding rows (unequal group sizes) are zeros, which add nothing to Gram matrices or gradients.
        """
        if self._contiguous is not None:
            k = self._contiguous
            return x if k == 1 else x.reshape(self.num_examples, k * x.shape[1], *x.shape[2:])
        padded = x.new_zeros(self.num_examples, self._max_rows, *x.shape[1:])
        idx = (self.row_to_example.to(x.device), self._position.to(x.device))
        padded[idx] = x
        return padded.reshape(self.num_examples, self._max_rows * x.shape[1], *x.shape[2:])

    def gram(self, x: torch.Tensor) -> tuple[torch.Tensor, float]:
        """(B, T, d) -> (E, K*T, K*T): Gram matrices of each example's tokens, in at least fp32, from operands in x's
        dtype; and the relative rounding error of their entries (`precision.matmul`)."""
        tokens = self.rows_end_to_end(x)
        return matmul(tokens, tokens.mT)

    def shared(self, x: torch.Tensor, tag: object, compute: Callable[[], T]) -> T:
        """`compute()`, kept for the next call on the same tensor x (same memory and layout) with the same tag.

        One backward, one RowGroups: attention's q, k and v projections read one input and their output gradients
        arrive one after another, so they share what is derived from it (its Gram). x is kept with the value, so
        no other tensor can take its address meanwhile.
        """
        key = (x.data_ptr(), x.shape, x.stride(), x.dtype, tag)
        if self._last is None or self._last[0] != key:
            self._last = (key, x, compute())
        return self._last[2]

    def sum_rows(self, x: torch.Tensor) -> torch.Tensor:
        """(B, ...) -> (E, ...): per-example sums of per-row quantities."""
        if self._contiguous is not None:
            k = self._contiguous
            return x if k == 1 else x.reshape(self.num_examples, k, *x.shape[1:]).sum(1)
        out = x.new_zeros(self.num_examples, *x.shape[1:])
        return out.index_add_(0, self.row_to_example.to(x.device), x)

    def stacked(self, copies: int) -> RowGroups:
        """The groups of `copies` batches laid one after another along the rows (L layers' rows stacked); one
        object per number of copies, so that stacks of one input (q, k, v) share what `shared` keeps."""
        if copies not in self._stacked:
            if self._contiguous is not None:
                self._stacked[copies] = RowGroups(None, copies * self.num_rows, self._contiguous)
            else:
                offsets = torch.arange(copies).repeat_interleave(self.num_rows) * self.num_examples
                ids = self.row_to_example.repeat(copies) + offsets
                self._stacked[copies] = RowGroups(ids, copies * self.num_rows)
        return self._stacked[copies]

    def expand(self, per_example: torch.Tensor) -> torch.Tensor:
        """(E,) -> (B,): each row gets its example's value."""
        if self._contiguous is not None:
            return per_example.repeat_interleave(self._contiguous)
        return per_example[self.row_to_example.to(per_example.device)]
