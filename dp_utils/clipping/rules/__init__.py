"""Per-layer rules of the clipping engine: one table, layer type -> (norm rule, summed-gradient rule).

Each rule sees every call of a module in one forward as a (layer input, gradient of layer output) pair:
- norm(module, calls, groups) -> NormTerms: (E,) squared norms (at least fp32) of each example's gradient of the
  module's trainable parameters, summed over calls and over the example's rows, with bounds on their rounding
  errors (`dp_utils.clipping.precision`);
- summed_grads(module, calls) -> {param name: the gradient summed over rows and calls}; the engine has already
  multiplied each row's output gradient by that row's clip factor, so this is sum_b c_b g_b;
- stacked_sums (optional): the same for L layers of one shape at once, their pairs stacked along the rows; norm
  must then accept such a stack too (its L * E examples are folded back to E by the engine).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from torch import nn

from .conv2d import conv2d_norm, conv2d_summed_grads, conv2d_unsupported
from .embedding import embedding_norm, embedding_summed_grads, embedding_unsupported
from .linear import linear_norm, linear_stacked_sums, linear_summed_grads
from .norm import affine_norm, affine_summed_grads


@dataclass(frozen=True)
class LayerRule:
    norm: Callable
    summed_grads: Callable
    unsupported: Callable[[nn.Module], str | None] = lambda module: None  # why a configuration is not covered
    autocast: bool = False  # autocast runs the layer in its lower precision (linear, conv): so are its inputs kept
    # stacked_sums(module, a, g, L): per-layer sums of L layers of one shape whose (input, output gradient) pairs are
    # stacked along the rows, {name: (L, *shape)}; a rule that has it has its norms computed on the stack too
    stacked_sums: Callable | None = None


RULES: dict[type, LayerRule] = {
    nn.Linear: LayerRule(linear_norm, linear_summed_grads, autocast=True, stacked_sums=linear_stacked_sums),
    nn.Conv2d: LayerRule(conv2d_norm, conv2d_summed_grads, conv2d_unsupported, autocast=True),
    nn.Embedding: LayerRule(embedding_norm, embedding_summed_grads, embedding_unsupported),
    nn.LayerNorm: LayerRule(affine_norm, affine_summed_grads),
    nn.GroupNorm: LayerRule(affine_norm, affine_summed_grads),
}
