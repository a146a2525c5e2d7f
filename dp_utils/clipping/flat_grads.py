"""One flat gradient buffer per (device, dtype): every trainable parameter's `.grad` is a view of it.

The views are assigned once and never rebound: the engine adds each layer's clipped sum into them, the DP optimizer
noises and scales each buffer in one pass and zeroes it in place, so the step's memory addresses never change (what
a CUDA graph replays). A caller who sets `.grad` to None or to another tensor gets the view back at the next
backward, holding what they set.
"""

from __future__ import annotations

import torch


class FlatGradients:
    def __init__(self, params: list[torch.Tensor]):
        by_kind: dict[tuple, list[torch.Tensor]] = {}
        for p in params:
            by_kind.setdefault((p.device, p.dtype), []).append(p)
        self.buffers: list[torch.Tensor] = []
        self.views: dict[torch.Tensor, torch.Tensor] = {}
        for (device, dtype), kind in by_kind.items():
            flat = torch.zeros(sum(p.numel() for p in kind), device=device, dtype=dtype)
            self.buffers.append(flat)
            offset = 0
            for p in kind:
                self.views[p] = flat[offset : offset + p.numel()].view(p.shape)
                offset += p.numel()
        self.attach()

    def attach(self) -> None:
        """Make every `.grad` its view again (keeping what it held)."""
        for p, view in self.views.items():
            grad = p.grad
            if grad is view:
                continue
            if grad is None:
                view.zero_()
            else:
                view.copy_(grad)
            p.grad = view

    def zero_(self) -> None:
        for flat in self.buffers:
            flat.zero_()

    def numel(self) -> int:
        return sum(flat.numel() for flat in self.buffers)
