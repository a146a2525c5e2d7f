"""One flat gradient buffer per (device, dtype): every trainable parameter's `.grad` is a view of it.

The views are assigned once and never rebound: the engine adds each layer's clipped sum into them, the DP optimizer
noises and scales each buffer in one pass and zeroes it in place, so the step's memory addresses never change (what
a CUDA graph replays). A caller who sets `.grad` to None or to another tensor gets the view back at the next
backward, holding what they set.
"""

from __future__ import annotations

from collections.abc import Callable

import torch


class FlatGradients:
    def __init__(self, params: list[torch.Tensor]):
        self.buffers: list[torch.Tensor] = []
        self.views: dict[torch.Tensor, torch.Tensor] = {}
        self.before_use: Callable[[], None] | None = None  # run before the buffers are next written (a pending fill)
        self._lay_out(params)
        self.attach()

    def _lay_out(self, params: list[torch.Tensor]) -> None:
        """One zeroed buffer per (device, dtype), the parameters' views in the given order."""
        by_kind: dict[tuple, list[torch.Tensor]] = {}
        for p in params:
            by_kind.setdefault((p.device, p.dtype), []).append(p)
        self.buffers, self.views = [], {}
        for (device, dtype), kind in by_kind.items():
            flat = torch.zeros(sum(p.numel() for p in kind), device=device, dtype=dtype)
            self.buffers.append(flat)
            offset = 0
            for p in kind:
                self.views[p] = flat[offset : offset + p.numel()].view(p.shape)
                offset += p.numel()

    def block(self, run: list[torch.Tensor]) -> torch.Tensor | None:
        """The (L, *shape) view of a run of L same-shaped parameters laid out one after another; None if they
        are not."""
        first = self.views[run[0]]
        numel, start = first.numel(), first.storage_offset()
        for i, p in enumerate(run):
            view = self.views[p]
            if view.untyped_storage().data_ptr() != first.untyped_storage().data_ptr():
                return None
            if view.shape != first.shape or view.storage_offset() != start + i * numel:
                return None
        return first.new_empty(0).set_(first.untyped_storage(), start, (len(run), *first.shape))

    def attach(self) -> None:
        """Make every `.grad` its view again (keeping what it held); first finish what fills the buffers."""
        if self.before_use is not None:
            before_use, self.before_use = self.before_use, None
            before_use()
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
