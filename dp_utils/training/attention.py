"""`--attention_backend`: which kernel computes attention, through diffusers' attention dispatcher.

diffusers' DiT calls `F.scaled_dot_product_attention` itself (`AttnProcessor2_0`), so its kernel is whatever SDPA
picks (on CUDA in bf16: the flash kernel). This installs, on every attention of that kind, a processor that computes
the same attention through `dispatch_attention_fn` with the chosen backend: diffusers' `native` (SDPA), its
`_native_*` SDPA kernels, or `flash` from the optional `flash-attn` package. The attention core owns no parameter,
so per-example clipping is exact with any backend.
"""

from __future__ import annotations

import torch
from diffusers.models.attention_dispatch import (
    AttentionBackendName,
    _check_attention_backend_requirements,
    dispatch_attention_fn,
)
from diffusers.models.attention_processor import Attention, AttnProcessor2_0

from ..errors import UserError

ATTENTION_BACKENDS = ("native", "_native_math", "_native_efficient", "_native_flash", "_native_cudnn", "flash")
CUDA_ONLY = ("_native_efficient", "_native_cudnn", "flash")


class DispatchAttnProcessor:
    """AttnProcessor2_0's self- and cross-attention, its core computed by diffusers' dispatcher with `backend`."""

    def __init__(self, backend: AttentionBackendName):
        self.backend = backend

    def __call__(
        self,
        attn: Attention,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        **kwargs,
    ) -> torch.Tensor:
        batch_size = hidden_states.shape[0]
        context = hidden_states if encoder_hidden_states is None else encoder_hidden_states
        if attention_mask is not None:
            attention_mask = attn.prepare_attention_mask(attention_mask, context.shape[1], batch_size)
            attention_mask = attention_mask.view(batch_size, attn.heads, -1, attention_mask.shape[-1])
        query, key, value = attn.to_q(hidden_states), attn.to_k(context), attn.to_v(context)
        head_dim = key.shape[-1] // attn.heads
        query, key, value = (x.view(batch_size, -1, attn.heads, head_dim) for x in (query, key, value))  # (B, S, H, D)
        out = dispatch_attention_fn(query, key, value, attn_mask=attention_mask, backend=self.backend)
        out = out.reshape(batch_size, -1, attn.heads * head_dim).to(query.dtype)
        return attn.to_out[1](attn.to_out[0](out)) / attn.rescale_output_factor


def set_attention_backend(model: torch.nn.Module, name: str) -> int:
    """Compute every SDPA attention of `model` with backend `name`; returns how many were switched.

    Raises UserError for a backend that is unknown or not installed, or a model with no such attention."""
    if name not in ATTENTION_BACKENDS:
        raise UserError(f"--attention_backend must be one of {', '.join(ATTENTION_BACKENDS)}, got {name!r}.")
    if name in CUDA_ONLY and any(p.device.type != "cuda" for p in model.parameters()):
        raise UserError(f"--attention_backend {name} runs on CUDA only; on this device use native or _native_math.")
    backend = AttentionBackendName(name)
    try:
        _check_attention_backend_requirements(backend)
    except (RuntimeError, ImportError) as error:
        raise UserError(f"--attention_backend {name} is not available here ({error}); use native.") from None
    kinds = (AttnProcessor2_0, DispatchAttnProcessor)
    attentions = [m for m in model.modules() if isinstance(m, Attention) and isinstance(m.processor, kinds)]
    unsupported = [m for m in attentions if m.spatial_norm is not None or m.group_norm is not None]
    unsupported += [m for m in attentions if m.residual_connection or m.norm_q is not None or m.norm_k is not None]
    if not attentions or unsupported:
        raise UserError(
            f"--attention_backend applies to plain SDPA attention (diffusers' AttnProcessor2_0, as in DiT); "
            f"{type(model).__name__} has {len(attentions) - len(unsupported)} such modules and {len(unsupported)} "
            "with extras it does not handle. Leave --attention_backend unset."
        )
    for module in attentions:
        module.set_processor(DispatchAttnProcessor(backend))
    return len(attentions)
