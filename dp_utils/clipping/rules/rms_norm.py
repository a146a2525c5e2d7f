"""diffusers' RMSNorm (SD3's q/k norms): y = x_hat * w (+ b), x_hat = x / sqrt(mean(x^2) + eps) over the last
dimension; per-example gradients are small, so instantiate them like the affine norms' (`norm.py`)."""

from __future__ import annotations

import torch
from diffusers.models.normalization import RMSNorm

from ..precision import LOW_PRECISION, upcast


def rms_norm_unsupported(module: RMSNorm) -> str | None:
    return None if len(module.dim) == 1 else f"normalized shape {tuple(module.dim)} (one dimension is covered)"


def rms_norm_row_grads(module: RMSNorm, x: torch.Tensor, g: torch.Tensor) -> dict[str, torch.Tensor]:
    """x_hat as the layer computes it (its variance in fp32, rounded to a bf16/fp16 weight's dtype), then
    per-row sums over positions of g * x_hat and g."""
    variance = x.to(torch.float32).pow(2).mean(-1, keepdim=True)
    x_hat = x * torch.rsqrt(variance + module.eps)
    if module.weight is not None and module.weight.dtype in LOW_PRECISION:
        x_hat = x_hat.to(module.weight.dtype)
    g, x_hat = upcast(g), upcast(x_hat)
    positions = (x.shape[0], -1, x.shape[-1])
    return {"weight": (g * x_hat).reshape(positions).sum(1), "bias": g.reshape(positions).sum(1)}
