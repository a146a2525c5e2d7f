"""Per-layer rules of the clipping engine: one table, layer type -> (norm rule, summed-gradient rule).

Each rule sees every call of a module in one forward as a (layer input, gradient of layer output) pair:
- norm(module, calls, groups) -> NormTerms: (E,) squared norms (at least fp32) of each example's gradient of the
  module's trainable parameters, summed over calls and over the example's rows, with bounds on their rounding
  errors (`dp_utils.clipping.precision`);
- summed_grads(module, calls) -> {param name: the gradient summed over rows and calls}; the engine has already
  multiplied each row's output gradient by that row's clip factor, so this is sum_b c_b g_b;
- stacked_add (optional): the same for L layers of one shape at once, their pairs stacked along the rows, added in
  place into (L, *shape) blocks of the gradient buffer; norm must then accept such a stack too (its L * E
  examples are folded back to E by the engine).
A rule covers the parameters named in `params`; one with a `capture` hands the engine its pairs itself (hooks it
installs), in place of the engine's capture at the module's output.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from diffusers.models.attention import BasicTransformerBlock
from diffusers.models.normalization import RMSNorm
from diffusers.models.transformers.pixart_transformer_2d import PixArtTransformer2DModel
from diffusers.models.transformers.sana_transformer import SanaTransformer2DModel, SanaTransformerBlock
from torch import nn

from ..tables import table_capture
from .conv2d import conv2d_norm, conv2d_summed_grads, conv2d_unsupported
from .embedding import embedding_norm, embedding_stacked_add_, embedding_summed_grads, embedding_unsupported
from .linear import linear_norm, linear_stacked_add_, linear_summed_grads
from .norm import affine_norm, affine_summed_grads
from .rms_norm import rms_norm_unsupported
from .table import TABLE, table_norm, table_summed_grads, table_unsupported


@dataclass(frozen=True)
class LayerRule:
    norm: Callable
    summed_grads: Callable
    unsupported: Callable[[nn.Module], str | None] = lambda module: None  # why a configuration is not covered
    autocast: bool = False  # autocast runs the layer in its lower precision (linear, conv): so are its inputs kept
    # stacked_add(module, a, g, blocks): adds to blocks[name] (L, *shape) the sums of L layers of one shape whose
    # pairs are stacked along the rows; a rule that has it has its norms computed on the stack too
    stacked_add: Callable | None = None
    params: tuple[str, ...] = ("weight", "bias")  # the module's own parameters the rule covers
    capture: Callable | None = None  # capture(engine, module) -> hook handles, where not at the module's output


# PixArt's and Sana's blocks and models own a scale_shift_table (and no weight or bias of their own)
_TABLE_RULE = LayerRule(
    table_norm, table_summed_grads, table_unsupported, params=(TABLE,), capture=table_capture((TABLE,))
)


RULES: dict[type, LayerRule] = {
    nn.Linear: LayerRule(linear_norm, linear_summed_grads, autocast=True, stacked_add=linear_stacked_add_),
    nn.Conv2d: LayerRule(conv2d_norm, conv2d_summed_grads, conv2d_unsupported, autocast=True),
    nn.Embedding: LayerRule(
        embedding_norm, embedding_summed_grads, embedding_unsupported, stacked_add=embedding_stacked_add_
    ),
    nn.LayerNorm: LayerRule(affine_norm, affine_summed_grads),
    nn.GroupNorm: LayerRule(affine_norm, affine_summed_grads),
    RMSNorm: LayerRule(affine_norm, affine_summed_grads, rms_norm_unsupported),
    BasicTransformerBlock: _TABLE_RULE,
    PixArtTransformer2DModel: _TABLE_RULE,
    SanaTransformerBlock: _TABLE_RULE,
    SanaTransformer2DModel: _TABLE_RULE,
}
