"""The clipping engine: exact per-example gradient norms and clipped gradient sums from one backward pass.

Forward hooks on every module that owns trainable parameters keep, per call, the layer input; the layer output
passes through an identity autograd function that hands the engine the output gradient during the backward.
The backward is driven by `torch.autograd.grad` towards a dummy leaf that every hooked output is tied to, so
autograd computes activation gradients only, never parameter gradients. From the (input, output-gradient)
pairs the per-layer rules give per-example norms (ghost norm or instantiation), then

    norms:  ||g_e||^2 = sum over layers of the layer's per-example squared norm    (all calls, all rows of e)
    clip:   c_e = min(1, C / (||g_e|| + 1e-6))
    sum:    p.grad += sum_e c_e g_e
            flash_bk: scale each stored output gradient by its row's c_e, then one matmul per layer from the
                      stored pairs (book-keeping, no second backward)
            flash:    a second backward of sum_b c_e(b) loss_b (norms were computed on the fly, pairs freed)

Noise and scaling are the optimizer's stages (Opacus' DPOptimizerFastGradientClipping).
"""

from __future__ import annotations

import torch
from torch import nn

from .groups import RowGroups
from .rules import RULES, LayerRule

MODES = ("flash_bk", "flash")


class UnsupportedModuleError(ValueError):
    """A module owns trainable parameters that no per-example rule covers."""


class _CatchGrad(torch.autograd.Function):
    """Identity on a layer output; its backward reports the output gradient to the engine."""

    @staticmethod
    def forward(ctx, output, anchor, report):
        ctx.report = report
        return output.view_as(output)

    @staticmethod
    def backward(ctx, grad):
        ctx.report(grad)
        return grad, None, None


def trainable_layers(module: nn.Module) -> dict[nn.Module, tuple[str, LayerRule]]:
    """Every sub-module owning trainable parameters, with its rule; raises for anything not covered exactly."""
    layers, owner_of = {}, {}
    for name, sub in module.named_modules():
        params = [(n, p) for n, p in sub.named_parameters(recurse=False) if p.requires_grad]
        if not params:
            continue
        path = name or "<root module>"
        rule = RULES.get(type(sub))
        unknown = [n for n, _ in params if n not in ("weight", "bias")]
        if rule is None:
            reason = "no per-example rule for this layer type"
        elif unknown:
            reason = f"extra parameters {unknown} beyond weight and bias"
        else:
            reason = rule.unsupported(sub)
        if reason:
            raise UnsupportedModuleError(
                f"Module '{path}' ({type(sub).__name__}) has trainable parameters "
                f"{[n for n, _ in params]} but per-example clipping does not support it: {reason}. "
                f"Supported: {', '.join(t.__name__ for t in RULES)}. Freeze it "
                f"(`model.get_submodule('{name}').requires_grad_(False)`) or replace it with supported layers."
            )
        for n, p in params:
            if p in owner_of:
                raise UnsupportedModuleError(
                    f"Parameter '{path}.{n}' is also '{owner_of[p]}' (tied parameters across modules); "
                    "per-example norms of tied parameters are not supported. Untie or freeze them."
                )
            owner_of[p] = f"{path}.{n}"
        layers[sub] = (path, rule)
    return layers


class ClippingEngine:
    """Attaches to a model in place; `backward(losses)` leaves sum_e c_e g_e in every trainable `.grad`."""

    def __init__(self, module: nn.Module, max_grad_norm: float, mode: str = "flash_bk"):
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        if max_grad_norm <= 0:
            raise ValueError(f"max_grad_norm must be positive, got {max_grad_norm}")
        self.module = module
        self.max_grad_norm = max_grad_norm
        self.mode = mode
        self.layers = trainable_layers(module)
        self.per_example_norms: torch.Tensor | None = None  # (E,) norms of the last backward, before clipping
        self._anchor = torch.zeros((), requires_grad=True)
        self._calls: dict[nn.Module, list[list]] = {}  # module -> [[layer input, output grad or None], ...]
        self._norm_sq: torch.Tensor | None = None
        self._counted: set[nn.Module] = set()  # layers whose norms are in _norm_sq
        self._groups: RowGroups | None = None
        self._capturing = False
        self._handles = [module.register_forward_pre_hook(self._start_forward)]
        self._handles += [layer.register_forward_hook(self._capture) for layer in self.layers]

    def detach(self) -> None:
        """Remove the hooks; the model is as before."""
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def _start_forward(self, module, args):
        if torch.is_grad_enabled():
            self._calls = {}

    def _capture(self, layer, inputs, output):
        if not torch.is_grad_enabled() or not output.requires_grad:
            return None
        calls = self._calls.setdefault(layer, [])
        call = [inputs[0], None]
        calls.append(call)
        return _CatchGrad.apply(output, self._anchor, lambda grad: self._on_grad(layer, call, grad))

    def _on_grad(self, layer, call, grad):
        if not self._capturing:
            return
        call[1] = grad
        calls = self._calls[layer]
        if all(g is not None for _, g in calls):
            self._add_norms(layer, calls)
            self._counted.add(layer)
            if self.mode == "flash":
                del self._calls[layer]  # the second backward recomputes the gradient; free the pair now

    def _add_norms(self, layer, calls):
        path, rule = self.layers[layer]
        for x, _ in calls:
            if x.shape[0] != self._groups.num_rows:
                raise ValueError(
                    f"Module '{path}' saw an input with {x.shape[0]} rows but the loss has {self._groups.num_rows}: "
                    "per-example clipping needs the batch as the first dimension of every layer input, one "
                    "forward per backward, and one loss per row."
                )
        with torch.autocast(calls[0][1].device.type, enabled=False):
            norm_sq = rule.norm_sq(layer, calls, self._groups)
        self._norm_sq = norm_sq if self._norm_sq is None else self._norm_sq + norm_sq.to(self._norm_sq.device)

    def _check_coverage(self):
        covered = {p for layer in self.layers for p in layer.parameters(recurse=False)}
        for name, p in self.module.named_parameters():
            if p.requires_grad and p not in covered:
                raise UnsupportedModuleError(
                    f"Parameter '{name}' became trainable after the model was made private; its gradient would "
                    "not be clipped. Set requires_grad before calling make_private."
                )

    def backward(self, losses: torch.Tensor, groups: RowGroups) -> None:
        """Clip each example's gradient of its summed row losses to max_grad_norm; add the sum to `.grad`."""
        self._check_coverage()
        self.per_example_norms = None
        if losses.numel() == 0:
            return
        self._groups, self._norm_sq, self._counted, self._capturing = groups, None, set(), True
        try:  # norms accumulate as the output gradients arrive
            torch.autograd.grad(losses.sum(), [self._anchor], retain_graph=self.mode == "flash", allow_unused=True)
            with torch.no_grad():  # the engine's own arithmetic must not build a graph on the stored activations
                row_coef = self._clip_factors(losses, groups)
        finally:  # also drops the groups' last Gram and the input it keeps
            self._capturing, self._groups = False, None
        if self.mode == "flash":
            self._calls = {}
            (row_coef.to(losses.device, losses.dtype) * losses).sum().backward()
        else:
            with torch.no_grad():
                self._book_keeping(row_coef)

    def _clip_factors(self, losses: torch.Tensor, groups: RowGroups) -> torch.Tensor:
        """Per-row clip factor c_e(b) = min(1, C / (||g_e|| + 1e-6)), (B,)."""
        for layer, calls in self._calls.items():  # layers with calls whose output never reached the loss
            answered = [call for call in calls if call[1] is not None]
            if answered and layer not in self._counted:
                self._add_norms(layer, answered)
        norm_sq = self._norm_sq if self._norm_sq is not None else losses.new_zeros(groups.num_examples)
        self.per_example_norms = norm_sq.sqrt()
        coef = (self.max_grad_norm / (self.per_example_norms + 1e-6)).clamp(max=1.0)
        return groups.expand(coef)

    def _book_keeping(self, row_coef: torch.Tensor) -> None:
        """p.grad += sum_b c_b g_b for every trainable parameter, from the stored inputs and output gradients."""
        answered = {layer: [call for call in calls if call[1] is not None] for layer, calls in self._calls.items()}
        self._scale_output_grads([call for calls in answered.values() for call in calls], row_coef)
        for layer, calls in answered.items():
            if not calls:
                continue
            with torch.autocast(calls[0][1].device.type, enabled=False):
                grads = self.layers[layer][1].summed_grads(layer, calls)
            for name, grad in grads.items():
                param = getattr(layer, name)
                grad = grad.to(param.dtype)
                param.grad = grad if param.grad is None else param.grad + grad
        self._calls = {}

    @staticmethod
    def _scale_output_grads(calls: list[list], row_coef: torch.Tensor) -> None:
        """g_b <- c_b g_b for every stored output gradient, so that each layer's plain gradient is the clipped sum.

        In place: the backward is over and the gradients are ours alone, which saves a copy per layer. A gradient
        that autograd handed to several layers (one tensor) is scaled once; one that shares memory with another in
        a different layout (views of one tensor) or is not contiguous is replaced by a scaled copy.
        """
        layouts: dict[int, set] = {}
        for _, g in calls:
            layouts.setdefault(g.untyped_storage().data_ptr(), set()).add((g.data_ptr(), g.shape, g.stride()))
        scaled: dict[tuple, torch.Tensor] = {}
        for call in calls:
            g = call[1]
            key = (g.data_ptr(), g.shape, g.stride())
            if key not in scaled:
                coef = row_coef.to(g.device).view(-1, *[1] * (g.dim() - 1))
                alone = len(layouts[g.untyped_storage().data_ptr()]) == 1
                scaled[key] = g.mul_(coef) if alone and g.is_contiguous() else g * coef
            call[1] = scaled[key]
