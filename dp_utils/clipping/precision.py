"""Arithmetic in the dtype a layer computes in, and bounds on what its rounding can do to the clipping.

Under bf16/fp16 autocast the engine keeps layer inputs and output gradients in the layer's dtype and multiplies them
as they are, accumulating in fp32 (as autograd's own weight gradients do). Two roundings then touch the guarantee:
- a product rounded to bf16 (a Gram matrix or a per-example gradient where no fp32 output is available, e.g. on CPU)
  makes the computed norm inexact; each entry carries a relative error of at most u, the dtype's unit roundoff;
- the clipped output gradient c * g is rounded to bf16 before the clipped sum is formed, which can add up to
  u c ||G||_F ||[A, 1]||_2 to a layer's part of an example's contribution (G its output gradients, A its inputs,
  1 the bias' column); layers own disjoint parameters, so these errors add in quadrature over layers.
`NormTerms` carries both bounds per example and the engine clips against their sum, so every example's contribution,
as actually summed, has norm at most C. fp32 and fp64 arithmetic is treated as exact, as in every DP-SGD library.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

LOW_PRECISION = (torch.bfloat16, torch.float16)
_CUDA_FP32_OUTPUT = all(hasattr(op, "dtype") for op in (torch.ops.aten.mm, torch.ops.aten.bmm))  # torch >= 2.8


@functools.cache
def unit_roundoff(dtype: torch.dtype) -> float:
    """Largest relative rounding error of a bf16/fp16 result; 0 for fp32 and wider (treated as exact)."""
    return torch.finfo(dtype).eps / 2 if dtype in LOW_PRECISION else 0.0


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """At least fp32: where norms and sums accumulate (torch.promote_types(dtype, float32) without dispatching
    an op: every step then dispatches the same ops from its first)."""
    return dtype if dtype.is_floating_point and dtype.itemsize >= 4 else torch.float32


def upcast(x: torch.Tensor) -> torch.Tensor:
    """At least fp32 (norms and sums accumulate there)."""
    return x.to(accumulation_dtype(x.dtype))


def square_sums(x: torch.Tensor) -> torch.Tensor:
    """(E, ...) -> (E,): each example's sum of squares, accumulated in at least fp32."""
    return torch.linalg.vector_norm(x.flatten(1), dim=1, dtype=accumulation_dtype(x.dtype)).square()


def frobenius(x: torch.Tensor) -> torch.Tensor:
    """(E, ...) -> (E,): each example's Frobenius norm."""
    return torch.linalg.vector_norm(x.flatten(1), dim=1)


def matmul(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, float]:
    """a @ b from operands in their own (common) dtype, the result in at least fp32; and the relative rounding error
    of its entries: 0 where the product is written in fp32 (CUDA), u where it is first rounded to bf16/fp16."""
    dtype = a.dtype
    if b.dtype != dtype:
        dtype = torch.promote_types(dtype, b.dtype)
        a, b = a.to(dtype), b.to(dtype)
    product = torch.mm if a.dim() == 2 else torch.bmm  # not `@`: one op, not four (fewer host calls per layer)
    if dtype not in LOW_PRECISION:
        return product(a, b), 0.0  # fp32 or wider already
    if a.is_cuda and _CUDA_FP32_OUTPUT:  # cuBLAS writes the fp32 accumulator out as is
        return product(a, b, out_dtype=torch.float32), 0.0
    return product(a, b).float(), unit_roundoff(dtype)


def in_dtype_rounded_down(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Non-negative x in `dtype`, each value the largest representable one <= x: a clip factor applied in the
    gradient's own dtype (fast), which never clips less than the factor the bound was computed for."""
    y = x.to(dtype)
    return torch.where(y.to(x.dtype) > x, torch.nextafter(y, torch.zeros_like(y)), y)


def relative_bound(*errors: float) -> float:
    """For a product of factors each off by a relative error <= u_i: |exact - computed| <= this * |computed|."""
    bound = 1.0
    for u in errors:
        bound /= 1 - u
    return bound - 1


@dataclass
class NormTerms:
    """Per-example (E,) terms of one layer's or the whole model's gradient norm.

    norm_sq: the squared norm as computed; norm_sq_error: a bound on |exact - computed| from low-precision products;
    scaling_error_sq: the square of a bound, per unit of clip factor, on the norm that rounding c * g can add to the
    contribution (terms of different layers add: their parameters are disjoint).
    """

    norm_sq: torch.Tensor
    norm_sq_error: torch.Tensor | float = 0.0
    scaling_error_sq: torch.Tensor | float = 0.0

    @staticmethod
    def total(terms: list[NormTerms]) -> NormTerms:
        """The sum over layers, one stacked sum per field (not an add per layer: fewer kernels on a GPU)."""

        def add(values: list) -> torch.Tensor | float:
            tensors = [v for v in values if isinstance(v, torch.Tensor)]
            if not tensors:
                return 0.0
            dtypes = {t.dtype for t in tensors}
            dtype = dtypes.pop() if len(dtypes) == 1 else functools.reduce(torch.promote_types, dtypes)
            return torch.stack([t.to(dtype) for t in tensors]).sum(0)

        fields = ([t.norm_sq for t in terms], [t.norm_sq_error for t in terms], [t.scaling_error_sq for t in terms])
        return NormTerms(*(add(values) for values in fields))

    def fold(self, copies: int) -> NormTerms:
        """Terms of `copies` layers computed as one (copies * E,) batch, summed per example: (E,)."""

        def fold(value: torch.Tensor | float) -> torch.Tensor | float:
            return value.view(copies, -1).sum(0) if isinstance(value, torch.Tensor) else value * copies

        return NormTerms(fold(self.norm_sq), fold(self.norm_sq_error), fold(self.scaling_error_sq))

    def upper_norm(self) -> torch.Tensor:
        """An upper bound on each example's contribution norm per unit of clip factor."""
        return (self.norm_sq + self.norm_sq_error).sqrt() + torch.as_tensor(self.scaling_error_sq).sqrt()
