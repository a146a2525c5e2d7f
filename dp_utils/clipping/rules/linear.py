"""nn.Linear: per-example norms by the ghost norm or by instantiation, whichever is cheaper.

For one example with inputs A (T, d) and output gradients G (T, p), the weight gradient is G^T A and
    ||G^T A||_F^2 = <A A^T, G G^T>          (ghost norm, Li et al. 2022; cost T^2 (d + p))
which avoids the (p, d) matrix when T (d + p) < d p. With one token (DiT's conditioning layers, 3 in each block)
the gradient g a^T has rank one and its norm is ||g|| ||a||: two sums of squares, no Gram matrices. Calls of a
reused module and rows of one example are concatenated along T, so the norm is that of the summed gradient, cross
terms included. The bias gradient is sum_t g_t. Products take the operands in the layer's dtype (bf16 under
autocast) and accumulate in fp32.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..groups import RowGroups
from ..precision import NormTerms, accumulation_dtype, frobenius, matmul, relative_bound, square_sums, unit_roundoff


@dataclass
class InputGram:
    """What the ghost norm needs of a layer input, computed once for all the layers that read it (q, k, v)."""

    gram: torch.Tensor  # (E, T, T): A A^T, plus J (all ones) for a trainable bias: [A, 1] [A, 1]^T
    error: float  # relative rounding error of the A A^T entries
    scaling_sq: torch.Tensor | None = None  # (E,) >= u^2 ||[A, 1]||_2^2: how far rounding c * g moves the gradient
    abs_gram: torch.Tensor | None = None  # |A A^T| (+ J), where the entries are rounded: bounds the norm's error


def input_gram(groups: RowGroups, a: torch.Tensor, bias: bool, u: float) -> InputGram:
    """The augmented Gram of a (B, T, d) and, for output gradients of unit roundoff u > 0 (bf16/fp16), the bounds'
    terms.

    ||[A, 1]||_2^2, the top eigenvalue of [A, 1][A, 1]^T, is at most its Frobenius norm; the exact one's is at most
    the computed one's plus err times the computed A A^T's, itself at most the computed [A, 1][A, 1]^T's plus
    ||J||_F = T.
    """
    gram, error = groups.gram(a)
    inputs = InputGram(gram + 1 if bias else gram, error)
    if u:
        err = relative_bound(error)
        inputs.scaling_sq = frobenius(inputs.gram) * (u**2 * (1 + err))
        if err and bias:
            inputs.scaling_sq = inputs.scaling_sq + u**2 * err * gram.shape[-1]
    if error:
        inputs.abs_gram = gram.abs() + 1 if bias else gram.abs()
    return inputs


def weight_and_bias_norm(module: nn.Module, a: torch.Tensor, g: torch.Tensor, groups: RowGroups) -> NormTerms:
    """Per-example norm terms of the trainable weight (g^T a) and bias (sum of g), a (B, T, d), g (B, T, p).

    c * g is rounded to g's dtype before the clipped sum: ||(delta G)^T [A, 1]||_F <= u ||G||_F ||[A, 1]||_2.
    """
    weight = module.weight.requires_grad
    bias = module.bias is not None and module.bias.requires_grad
    u = unit_roundoff(g.dtype)
    g_e = groups.rows_end_to_end(g)  # (E, K*T, p)
    tokens, d, p = g_e.shape[1], a.shape[-1], g.shape[-1]
    if tokens == 1:
        return _rank_one_terms(_augmented_square_sums(groups.rows_end_to_end(a) if weight else None, bias, 1), g_e, u)
    if weight and tokens * (d + p) < d * p:
        inputs = groups.shared(a, (bias, u), lambda: input_gram(groups, a, bias, u))
        return _ghost_terms(inputs, matmul(g_e, g_e.mT), u)
    terms = NormTerms(torch.zeros(g_e.shape[0], device=g.device, dtype=accumulation_dtype(g.dtype)))
    a_e = groups.rows_end_to_end(a) if weight else None
    if weight:
        per_example, err = matmul(g_e.mT, a_e)  # (E, p, d) gradients
        terms.norm_sq = square_sums(per_example)
        terms.norm_sq_error = relative_bound(err, err) * terms.norm_sq
    if bias:
        terms.norm_sq = terms.norm_sq + g_e.sum(1, dtype=terms.norm_sq.dtype).pow(2).sum(1)  # ||sum_t g_t||^2
    if u:  # ||[A, 1]||_2^2 <= ||[A, 1]||_F^2
        terms.scaling_error_sq = u**2 * square_sums(g_e) * _augmented_square_sums(a_e, bias, tokens)
    return terms


def _augmented_square_sums(a: torch.Tensor | None, bias: bool, tokens: int) -> torch.Tensor | float:
    """||[A, 1]||_F^2 per example: the input's sum of squares (None: frozen weight), plus one per token for a
    trainable bias."""
    return (square_sums(a) if a is not None else 0.0) + (tokens if bias else 0.0)


def _rank_one_terms(input_sq: torch.Tensor | float, g: torch.Tensor, u: float) -> NormTerms:
    """One token per example, g (E, 1, p), input_sq = ||[a, 1]||^2 (the trainable parts): ||g a^T||^2 + ||g||^2 =
    ||g||^2 (||a||^2 + 1) from sums of squares in at least fp32 (exact, as fp32 is treated). Rounding c * g moves
    the contribution by at most u ||g|| ||[a, 1]||, so that bound's square is u^2 times the norm's."""
    terms = NormTerms(square_sums(g) * input_sq)
    if u:
        terms.scaling_error_sq = terms.norm_sq * u**2
    return terms


def _ghost_terms(inputs: InputGram, grams_g: tuple[torch.Tensor, float], u: float) -> NormTerms:
    """||G^T [A, 1]||_F^2 = <[A, 1][A, 1]^T, G G^T> from the Gram matrices alone (E, T, T); ||G||_F^2 = tr(G G^T).

    A Gram entry off by a relative error <= err moves the inner product by at most err times that of the absolute
    values (`precision.relative_bound` combines both Grams' errors).
    """
    gram_g, err_g = grams_g
    g_flat = gram_g.flatten(1)
    # by vecdot, not a (1, T^2) @ (T^2, 1) bmm
    terms = NormTerms(torch.linalg.vecdot(inputs.gram.flatten(1), g_flat))
    if inputs.error or err_g:
        abs_gram = inputs.abs_gram if inputs.abs_gram is not None else inputs.gram.abs()
        terms.norm_sq_error = relative_bound(inputs.error, err_g) * torch.linalg.vecdot(
            abs_gram.flatten(1), g_flat.abs()
        )
    if u:
        terms.scaling_error_sq = gram_g.diagonal(dim1=1, dim2=2).sum(1) * inputs.scaling_sq
        if err_g:  # the trace ||G||_F^2 is itself rounded
            terms.scaling_error_sq = terms.scaling_error_sq * (1 + relative_bound(err_g))
    return terms


def matmul_sum(a: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """sum_b g_b^T a_b for a (B, T, d), g (B, T, p): one (p, d) matmul over all rows and tokens, in at least fp32."""
    return matmul(g.flatten(0, 1).mT, a.flatten(0, 1))[0]


def bias_sum(g: torch.Tensor) -> torch.Tensor:
    """sum_b sum_t g_b,t for g (B, T, p), in at least fp32."""
    return g.sum((0, 1), dtype=accumulation_dtype(g.dtype))


def concat_calls(pieces: list[torch.Tensor]) -> torch.Tensor:
    """Per-call (B, T_i, ...) pieces of a module's calls as one (B, sum T_i, ...): a reused module's calls are one
    sequence of tokens per row. No copy for a single call."""
    return pieces[0] if len(pieces) == 1 else torch.cat(pieces, 1)


def weight_and_bias_sums(module: nn.Module, a: torch.Tensor, g: torch.Tensor) -> dict[str, torch.Tensor]:
    """Summed gradients of the trainable weight (shaped like it) and bias, a (B, T, d), g (B, T, p)."""
    grads = {}
    if module.weight.requires_grad:
        grads["weight"] = matmul_sum(a, g).view_as(module.weight)
    if module.bias is not None and module.bias.requires_grad:
        grads["bias"] = bias_sum(g)
    return grads


def linear_stacked_add_(module: nn.Linear, a: torch.Tensor, g: torch.Tensor, blocks: dict[str, torch.Tensor]) -> None:
    """blocks[name][l] += layer l's summed gradient, for L layers shaped like `module` whose calls are stacked along
    the rows: a (L*B, ..., d), g (L*B, ..., p); weight block (L, p, d), bias block (L, p). Operands and block of
    one dtype (fp32 training): one baddbmm in place; else products in at least fp32, as `matmul` gives them."""
    copies = len(blocks["weight"] if "weight" in blocks else blocks["bias"])
    g = g.reshape(copies, -1, g.shape[-1])
    if "weight" in blocks:
        a, weight = a.reshape(copies, -1, a.shape[-1]), blocks["weight"]
        if a.dtype == g.dtype == weight.dtype:
            weight.baddbmm_(g.mT, a)
        else:
            weight.add_(matmul(g.mT, a)[0])
    if "bias" in blocks:
        blocks["bias"].add_(g.sum(1, dtype=accumulation_dtype(g.dtype)))


def inputs_and_grads_of_calls(calls: list[tuple[torch.Tensor, torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Inputs and output gradients of all calls as (B, T_total, d) and (B, T_total, p)."""
    a = concat_calls([as_sequence(x) for x, _ in calls])
    return a, concat_calls([as_sequence(y) for _, y in calls])


def as_sequence(x: torch.Tensor) -> torch.Tensor:
    """(B, ..., d) -> (B, T, d); a (B, T, d) tensor as it is (no view op: one less host call)."""
    return x if x.dim() == 3 else x.reshape(x.shape[0], -1, x.shape[-1])


def linear_norm(module: nn.Linear, calls: list, groups: RowGroups) -> NormTerms:
    return weight_and_bias_norm(module, *inputs_and_grads_of_calls(calls), groups)


def linear_summed_grads(module: nn.Linear, calls: list) -> dict[str, torch.Tensor]:
    return weight_and_bias_sums(module, *inputs_and_grads_of_calls(calls))
