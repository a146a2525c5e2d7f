"""Freezing, the work-around users know from Opacus ghost clipping; our engine needs none of it."""

from __future__ import annotations

from diffusers.models.embeddings import CombinedTimestepLabelEmbeddings, LabelEmbedding, TimestepEmbedding
from torch import nn

EMBEDDERS = (CombinedTimestepLabelEmbeddings, TimestepEmbedding, LabelEmbedding)


def freeze_embedders(model: nn.Module) -> list[str]:
    """Freeze every timestep/class embedder (about 78M of DiT-XL's 675M parameters); returns the frozen names."""
    frozen = []
    for name, module in model.named_modules():
        if isinstance(module, EMBEDDERS):
            for param_name, param in module.named_parameters():
                if param.requires_grad:
                    param.requires_grad_(False)
                    frozen.append(f"{name}.{param_name}")
    return frozen


def freeze_reused_modules(model: nn.Module, *args, **kwargs) -> list[str]:
    """Freeze the parameters of modules that run more than once in `model(*args, **kwargs)`; returns their names."""
    calls: dict[nn.Module, int] = {}
    handles = [
        m.register_forward_hook(lambda m, i, o: calls.__setitem__(m, calls.get(m, 0) + 1)) for m in model.modules()
    ]
    try:
        model(*args, **kwargs)
    finally:
        for handle in handles:
            handle.remove()
    frozen = []
    for name, module in model.named_modules():
        if calls.get(module, 0) > 1:
            for param_name, param in module.named_parameters(recurse=False):
                if param.requires_grad:
                    param.requires_grad_(False)
                    frozen.append(f"{name}.{param_name}")
    return frozen
