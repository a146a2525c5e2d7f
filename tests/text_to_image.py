"""Tiny random PixArt and SD3 transformers, saved and loaded back as a user loads a Hub checkpoint, and batches."""

from __future__ import annotations

import torch
from diffusers import PixArtTransformer2DModel, SD3Transformer2DModel

import dp_utils

CAPTION_TOKENS = 5
PIXART = dict(
    sample_size=8,
    num_layers=2,
    patch_size=2,
    attention_head_dim=8,
    num_attention_heads=2,
    in_channels=4,
    out_channels=8,
    cross_attention_dim=16,
    caption_channels=12,
    norm_type="ada_norm_single",
    norm_elementwise_affine=False,
    norm_eps=1e-6,
    use_additional_conditions=False,
)
SD3 = dict(
    sample_size=8,
    patch_size=2,
    in_channels=4,
    out_channels=4,
    num_layers=2,
    attention_head_dim=8,
    num_attention_heads=2,
    joint_attention_dim=12,
    caption_projection_dim=16,
    pooled_projection_dim=10,
    qk_norm="rms_norm",
    dual_attention_layers=(0,),  # SD3.5's second self-attention in the first block
)
MODELS = {"pixart": (PixArtTransformer2DModel, PIXART), "sd3": (SD3Transformer2DModel, SD3)}


def tiny_transformer(kind: str, tmp_path, seed: int = 0, dtype=torch.float32):
    """A random transformer of `kind` with non-trivial tables and norm weights (they start at fixed values)."""
    cls, config = MODELS[kind]
    torch.manual_seed(seed)
    model = cls(**config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name or "scale_shift_table" in name:
                p.normal_(1.0, 0.3)
    path = tmp_path / f"{kind}-{seed}"
    model.save_pretrained(path)
    return cls.from_pretrained(path, torch_dtype=dtype).train()


def text_batch(kind: str, rows: int, seed: int = 1, dtype=torch.float32):
    """(latents, timesteps, prompt embeddings, mask or pooled embeddings, target) for `kind`."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, 4, 8, 8, generator=g, dtype=dtype)
    emb = torch.randn(rows, CAPTION_TOKENS, 12, generator=g, dtype=dtype)
    target = torch.randn(rows, 4, 8, 8, generator=g, dtype=dtype)
    if kind == "pixart":
        t = torch.randint(0, 1000, (rows,), generator=g)
        mask = (torch.arange(CAPTION_TOKENS) < torch.randint(1, CAPTION_TOKENS + 1, (rows, 1), generator=g)).long()
        return x, t, emb, mask, target
    t = torch.rand(rows, generator=g, dtype=dtype) * 1000
    pooled = torch.randn(rows, 10, generator=g, dtype=dtype)
    return x, t, emb, pooled, target


def text_losses(model, x, t, emb, extra, target, criterion=dp_utils.per_sample_mse):
    """Per-row losses of a PixArt (extra: the caption mask) or SD3 (extra: pooled embeddings) forward."""
    if isinstance(model, PixArtTransformer2DModel) or "PixArt" in type(model).__name__:
        out = model(
            x,
            encoder_hidden_states=emb,
            timestep=t,
            encoder_attention_mask=extra,
            added_cond_kwargs={"resolution": None, "aspect_ratio": None},
        ).sample[:, :4]
    else:
        out = model(hidden_states=x, encoder_hidden_states=emb, pooled_projections=extra, timestep=t).sample
    return criterion(out, target)
