"""The clipping engine: exact per-example gradient norms and clipped gradient sums without per-example gradients.

Every module that owns trainable parameters gets a forward hook: its output passes through an identity autograd
function that saves the layer input (as autograd saves any tensor, so activation checkpointing recomputes it) and,
in the backward, hands the engine (layer input, output gradient). The backward is driven by `torch.autograd.grad`
towards a dummy anchor every hooked output is tied to, so autograd computes activation gradients only, never
parameter gradients. From the pairs the per-layer rules give per-example norms (ghost norm or instantiation), then

    norms:  ||g_e||^2 = sum over layers of the layer's per-example squared norm    (all calls, all rows of e)
    clip:   c_e = min(1, C / (||g_e|| + rounding bound))                              (`dp_utils.clipping.precision`)
    sum:    p.grad += sum_e c_e g_e, from each layer's pairs with the output gradient scaled by its row's c_e:
            flash_bk: one backward; the pairs are kept until the clip factors are known (book-keeping)
            flash:    two backwards; the first computes norms and drops each pair at once, the second recomputes the
                      pairs and sums them as they arrive. Memory as non-private training; also what flash_bk does
                      when the forward's saved tensors go through hooks (gradient checkpointing, offloading).

Under autocast, inputs of linear and convolution layers are cast once (shared by the layers reading one tensor, e.g.
q, k, v) to the dtype the layer computes in, so the engine keeps and multiplies what the layer itself uses.
Nothing outlives the backward: every captured tensor is released when it ends. A gradient the engine did not clip
is refused: a parameter used outside its layer, a backward not driven by the engine, a second forward before the
first one's backward. Noise and scaling are the optimizer's stages (Opacus' DPOptimizerFastGradientClipping).
"""

from __future__ import annotations

import contextlib
import math
import weakref
from dataclasses import dataclass

import torch
from torch import nn

from .groups import RowGroups
from .precision import NormTerms, in_dtype_rounded_down
from .rules import RULES, LayerRule

MODES = ("flash_bk", "flash")
_NO_CONTEXT = contextlib.nullcontext()


class UnsupportedModuleError(ValueError):
    """A module owns trainable parameters that no per-example rule covers."""


@dataclass(eq=False)
class _Call:
    """One call of a layer in the forward being clipped; its input and output gradient once the backward reaches it."""

    layer: nn.Module
    forward: int  # the engine's count of forwards when the call ran
    input: torch.Tensor | None = None
    grad: torch.Tensor | None = None

    def release(self) -> None:
        self.input = self.grad = None


class _CatchGrad(torch.autograd.Function):
    """Identity on a layer output; saves the layer input, and its backward reports (input, output gradient)."""

    @staticmethod
    def forward(ctx, output, layer_input, anchor, engine, call):
        ctx.engine, ctx.call = engine, call
        ctx.save_for_backward(layer_input)
        return output.view_as(output)

    @staticmethod
    def backward(ctx, grad):
        ctx.engine._on_grad(ctx.call, ctx.saved_tensors[0], grad)
        return grad, None, None, None, None


def trainable_layers(module: nn.Module) -> dict[nn.Module, tuple[str, LayerRule]]:
    """Every sub-module owning trainable parameters, with its rule; raises for anything not covered exactly."""
    layers, owner_of = {}, {}
    for name, sub in module.named_modules():
        params = [(n, p) for n, p in sub.named_parameters(recurse=False) if p.requires_grad]
        if not params:
            continue
        path = name or "<root module>"
        rule = RULES.get(type(sub))
        unknown = [n for n, _ in params if rule is not None and n not in rule.params]
        if rule is None:
            reason = "no per-example rule for this layer type"
        elif unknown:
            reason = f"extra parameters {unknown} beyond {' and '.join(rule.params)}"
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


class _RowFactors:
    """Row clip factors in each gradient's device and dtype, each rounded down (the product is rounded once)."""

    def __init__(self, row_coef: torch.Tensor):
        self.row_coef = row_coef
        self._cast: dict[tuple, torch.Tensor] = {}

    def for_grad(self, grad: torch.Tensor) -> torch.Tensor:
        key = (grad.device, grad.dtype)
        if key not in self._cast:
            self._cast[key] = in_dtype_rounded_down(self.row_coef.to(grad.device), grad.dtype)
        return self._cast[key].view(-1, *[1] * (grad.dim() - 1))


def _no_autocast(device_type: str) -> contextlib.AbstractContextManager:
    """The engine's products take their operands' dtypes as they are (autocast would recast vecdot and matmuls)."""
    return torch.autocast(device_type, enabled=False) if torch.is_autocast_enabled(device_type) else _NO_CONTEXT


def _saved_tensors_hooked() -> bool:
    """Whether autograd's saved tensors go through hooks now (activation checkpointing, offloading to CPU)."""
    return torch._C._autograd._top_saved_tensors_default_hooks(False) is not None


class ClippingEngine:
    """Attaches to a model in place; `backward(losses, groups)` leaves sum_e c_e g_e in every trainable `.grad`."""

    def __init__(self, module: nn.Module, max_grad_norm: float, mode: str = "flash_bk", record_norms: bool = False):
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        if not (isinstance(max_grad_norm, int | float) and math.isfinite(max_grad_norm) and max_grad_norm > 0):
            raise ValueError(f"max_grad_norm must be a positive finite number, got {max_grad_norm!r}")
        self.module = module
        self.max_grad_norm = float(max_grad_norm)
        self.mode = mode
        self.layers = trainable_layers(module)
        # (E,) norms of the last backward, before clipping: derived from the private data, so kept only when asked for
        self.record_norms = record_norms
        self.per_example_norms: torch.Tensor | None = None
        self.nonfinite: torch.Tensor | None = None  # True once a norm was not finite; read by the optimizer's step
        self._param_names = {
            p: f"{path}.{n}" if path != "<root module>" else n
            for layer, (path, _) in self.layers.items()
            for n, p in layer.named_parameters(recurse=False)
            if p.requires_grad
        }
        self._frozen = [(n, p) for n, p in module.named_parameters() if p not in self._param_names]
        self._anchors: dict[torch.device, torch.Tensor] = {}
        self._forward = 0
        self._calls: dict[nn.Module, list[_Call]] = {}  # the current forward's calls, per layer
        self._first_layers: set[nn.Module] = set()  # layers called on inputs that need no gradient (data, labels)
        self._nodes: list[weakref.ref] = []  # its graph nodes: alive while its loss can still be back-propagated
        self._recomputed = False  # its saved tensors went through hooks (checkpointing): do not keep them
        self._grad_forward = False  # inside a forward of the private model that builds a graph
        self._last_cast: tuple | None = None  # (input, version, its autocast copy)
        self._phase: str | None = None  # "norms" or "sums" while the engine drives a backward
        self._groups: RowGroups | None = None
        self._terms: list[NormTerms] = []  # per layer, summed when the clip factors are computed
        self._row_factors: _RowFactors | None = None
        self._two_pass = False
        self._handles = [
            module.register_forward_pre_hook(self._start_forward),
            module.register_forward_hook(self._end_forward),
        ]
        for layer, (_, rule) in self.layers.items():
            if rule.capture is not None:  # captured where its parameters are used, not at its output
                self._handles += rule.capture(self, layer)
                continue
            if rule.autocast:
                self._handles.append(layer.register_forward_pre_hook(self._cast_input))
            self._handles.append(layer.register_forward_hook(self._capture))
        self._handles += [p.register_post_accumulate_grad_hook(self._unclipped_gradient) for p in self._param_names]

    def detach(self) -> None:
        """Remove the hooks; the model is as before."""
        for handle in self._handles:
            handle.remove()
        self._handles = []

    # forward

    def _start_forward(self, module, args):
        self._grad_forward = torch.is_grad_enabled() and self._phase is None
        if not self._grad_forward:  # evaluation, or a recompute in the backward
            return
        if self._calls and any(node() is not None for node in self._nodes):
            raise RuntimeError(
                "The private model ran a second forward before the backward of the first: the engine clips one "
                "forward per backward. Call backward() on the first loss, or drop it (`del loss, prediction`) "
                "before the next forward; run evaluation under torch.no_grad()."
            )
        self._release()
        self._forward += 1

    def _end_forward(self, module, args, output):
        self._last_cast, self._grad_forward = None, False

    def _cast_input(self, layer, args):
        """Under autocast, hand the layer its input in the dtype autocast computes it in (one copy, shared)."""
        x = args[0]
        device = x.device.type
        if not (torch.is_autocast_enabled(device) and x.is_floating_point() and x.dtype != torch.float64):
            return None
        dtype = torch.get_autocast_dtype(device)
        if x.dtype == dtype:
            return None
        last = self._last_cast
        if last is None or last[0] is not x or last[1] != x._version:
            last = self._last_cast = (x, x._version, x.to(dtype))
        return (last[2], *args[1:])

    def _capture(self, layer, inputs, output):
        if not torch.is_grad_enabled() and self._grad_forward:
            raise RuntimeError(
                f"Layer '{self.layers[layer][0]}' ran without autograd inside a training forward (reentrant "
                "activation checkpointing, or torch.no_grad() around a trainable layer): its gradient could not be "
                "clipped. Use torch.utils.checkpoint with use_reentrant=False (diffusers' default), or freeze it."
            )
        if not torch.is_grad_enabled() or not isinstance(output, torch.Tensor) or not output.requires_grad:
            return None
        anchor = self.anchor(output.device)
        if self._phase is not None:  # a checkpointed forward recomputed in the backward: same saved tensors, no call
            return _CatchGrad.apply(output, inputs[0], anchor, self, None)
        self._recomputed |= _saved_tensors_hooked()
        call = _Call(layer, self._forward)
        self._calls.setdefault(layer, []).append(call)
        if not inputs[0].requires_grad:
            self._first_layers.add(layer)
        output = _CatchGrad.apply(output, inputs[0], anchor, self, call)
        self._nodes.append(weakref.ref(output.grad_fn))
        return output

    # captures other than a layer's output (`LayerRule.capture`, e.g. `dp_utils.clipping.tables`)

    def anchor(self, device: torch.device) -> torch.Tensor:
        """The leaf every captured tensor is tied to on this device: the engine's backward asks for its gradient."""
        anchor = self._anchors.get(device)
        if anchor is None:
            anchor = self._anchors[device] = torch.zeros((), device=device, requires_grad=True)
        return anchor

    def new_call(self, layer: nn.Module) -> _Call:
        """A call of `layer` in the current forward; the capture hands its pairs to `_on_grad` in the backward."""
        call = _Call(layer, self._forward)
        self._calls.setdefault(layer, []).append(call)
        return call

    # backward

    def backward(self, losses: torch.Tensor, groups: RowGroups) -> None:
        """Clip each example's gradient of its summed row losses to max_grad_norm; add the sum to `.grad`."""
        self._check_coverage()
        self.per_example_norms = None
        if losses.numel() == 0 or not self._calls:
            self._release()
            return
        self._check_graph(losses)
        self._groups, self._terms = groups, []
        self._two_pass = self.mode == "flash" or self._recomputed
        anchors = list(self._anchors.values())
        # The last pass also reaches the parameters of layers whose input needs no gradient: autograd runs (and
        # frees) a node only on a path to what it is asked for, and nothing else would free what those layers saved
        # for their weight gradient while the caller holds the loss. Those few small gradients are discarded.
        last_pass = anchors + [p for layer in self._first_layers for p in layer.parameters() if p in self._param_names]
        try:
            self._phase = "norms"  # norms accumulate as the output gradients arrive
            torch.autograd.grad(
                losses.sum(), anchors if self._two_pass else last_pass, retain_graph=self._two_pass, allow_unused=True
            )
            with torch.no_grad():  # the engine's own arithmetic must not build a graph on the stored activations
                row_coef = self._clip_factors(losses, groups)
                if not self._two_pass:
                    self._book_keeping(row_coef)
            if self._two_pass:
                self._release_calls()
                self._phase, self._row_factors = "sums", _RowFactors(row_coef)  # each layer's sum as its pairs return
                torch.autograd.grad(losses.sum(), last_pass, allow_unused=True)
        finally:  # nothing the engine captured outlives the backward, also when it fails
            self._phase, self._groups, self._terms, self._row_factors = None, None, [], None
            self._release()

    def _on_grad(self, call: _Call | None, layer_input: torch.Tensor, grad: torch.Tensor) -> None:
        if self._phase is None:
            raise RuntimeError(
                "A backward reached a private layer without the clipping engine (e.g. loss.sum().backward() on "
                "the per-example losses): its gradients would not be clipped. Call backward() on the loss the "
                "private criterion returns."
            )
        if call is None or call.forward != self._forward:
            raise RuntimeError("A backward reached a layer call of an earlier forward; the engine clips the last one.")
        if self._phase == "sums":
            self._add_clipped(call.layer, layer_input, grad)
            return
        call.input, call.grad = layer_input, grad
        calls = self._calls[call.layer]
        if all(c.grad is not None for c in calls):
            self._add_norms(call.layer, calls)
            if self._two_pass:
                for c in calls:
                    c.release()

    def _add_norms(self, layer: nn.Module, calls: list[_Call]) -> None:
        path, rule = self.layers[layer]
        for c in calls:
            if c.input.shape[0] != self._groups.num_rows:
                raise ValueError(
                    f"Module '{path}' saw an input with {c.input.shape[0]} rows but the loss has "
                    f"{self._groups.num_rows}: per-example clipping needs the batch as the first dimension of every "
                    "layer input, one forward per backward, and one loss per row."
                )
        with _no_autocast(calls[0].grad.device.type):
            terms = rule.norm(layer, [(c.input, c.grad) for c in calls], self._groups)
        self._terms.append(terms)

    def _clip_factors(self, losses: torch.Tensor, groups: RowGroups) -> torch.Tensor:
        """Per-row clip factor c_e(b) = min(1, C / (upper bound of ||g_e|| + 1e-6)), (B,)."""
        for layer, calls in self._calls.items():  # layers with calls whose output never reached the loss
            answered = [c for c in calls if c.grad is not None]
            if 0 < len(answered) < len(calls):  # a layer all of whose calls answered is counted (or released) already
                self._add_norms(layer, answered)
        terms = NormTerms.total(self._terms) if self._terms else NormTerms(losses.new_zeros(groups.num_examples))
        if self.record_norms:
            self.per_example_norms = terms.norm_sq.sqrt()
        nonfinite = ~torch.isfinite(terms.norm_sq).all()
        self.nonfinite = nonfinite if self.nonfinite is None else self.nonfinite | nonfinite
        coef = (self.max_grad_norm / (terms.upper_norm() + 1e-6)).clamp(max=1.0)
        return groups.expand(coef)

    def _add_clipped(self, layer: nn.Module, layer_input: torch.Tensor, grad: torch.Tensor) -> None:
        """Second pass of flash: add one call's clipped sum; the gradient flows on unscaled, so scale a copy."""
        self._accumulate(layer, [(layer_input, grad * self._row_factors.for_grad(grad))])

    def _book_keeping(self, row_coef: torch.Tensor) -> None:
        """p.grad += sum_b c_b g_b for every trainable parameter, from the stored inputs and output gradients."""
        answered = {layer: [c for c in calls if c.grad is not None] for layer, calls in self._calls.items()}
        self._scale_output_grads([c for calls in answered.values() for c in calls], _RowFactors(row_coef))
        for layer, calls in answered.items():
            if calls:
                self._accumulate(layer, [(c.input, c.grad) for c in calls])
            for c in calls:  # free as we go: the peak is the pairs kept, not the pairs plus all the gradients
                c.release()

    def _accumulate(self, layer: nn.Module, pairs: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
        with _no_autocast(pairs[0][1].device.type):
            grads = self.layers[layer][1].summed_grads(layer, pairs)
        for name, grad in grads.items():
            param = getattr(layer, name)
            if grad.dtype != param.dtype:
                grad = grad.to(param.dtype)
            param.grad = grad if param.grad is None else param.grad + grad

    @staticmethod
    def _scale_output_grads(calls: list[_Call], factors: _RowFactors) -> None:
        """g_b <- c_b g_b for every stored output gradient, so that each layer's plain gradient is the clipped sum.

        In place: the backward is over and the gradients are ours alone, which saves a copy per layer. A gradient
        that autograd handed to several layers (one tensor) is scaled once; one that shares memory with another in
        a different layout (views of one tensor) or is not contiguous is replaced by a scaled copy.
        """
        layouts: dict[int, set] = {}
        for c in calls:
            g = c.grad
            layouts.setdefault(g.untyped_storage().data_ptr(), set()).add((g.data_ptr(), g.shape, g.stride()))
        scaled: dict[tuple, torch.Tensor] = {}
        for c in calls:
            g = c.grad
            key = (g.data_ptr(), g.shape, g.stride())
            if key not in scaled:
                in_place = len(layouts[g.untyped_storage().data_ptr()]) == 1 and g.is_contiguous()
                factor = factors.for_grad(g)
                scaled[key] = g.mul_(factor) if in_place else g * factor
            c.grad = scaled[key]

    # guards

    def _check_coverage(self) -> None:
        for name, p in self._frozen:
            if p.requires_grad:
                raise UnsupportedModuleError(
                    f"Parameter '{name}' became trainable after the model was made private; its gradient would "
                    "not be clipped. Set requires_grad before calling make_private."
                )

    def _check_graph(self, losses: torch.Tensor) -> None:
        """Refuse a loss that reaches a trainable parameter other than through its layer's call, e.g.
        F.linear(x, layer.weight) or a penalty on the weights: that gradient would not be clipped."""
        seen, stack = set(), [losses.grad_fn]
        while stack:
            node = stack.pop()
            if node is None or node in seen:
                continue
            seen.add(node)
            if isinstance(node, _CatchGrad._backward_cls):  # skip the layer's own ops, go on from its input
                stack.append(node.next_functions[1][0])
                continue
            param = getattr(node, "variable", None)  # AccumulateGrad: a leaf
            if param is not None and param in self._param_names:
                raise UnsupportedModuleError(
                    f"Parameter '{self._param_names[param]}' is used outside its module's forward (e.g. "
                    "F.linear(x, module.weight), or a penalty on the weights in the loss): its per-example gradient "
                    "cannot be clipped. Use it only through its module; put weight decay in the optimizer."
                )
            stack.extend(next_node for next_node, _ in node.next_functions)

    def _unclipped_gradient(self, param: torch.Tensor) -> None:
        """A post-accumulate-grad hook: autograd itself wrote into a trainable parameter's gradient."""
        param.grad = None  # never let an unclipped gradient reach the optimizer
        raise RuntimeError(
            f"An unclipped gradient reached '{self._param_names[param]}'.grad: a backward outside the clipping "
            "engine (e.g. loss.backward() on a loss not from the private criterion). Call backward() on the loss "
            "the private criterion returns."
        )

    # state

    def _release_calls(self) -> None:
        for calls in self._calls.values():
            for c in calls:
                c.release()

    def _release(self) -> None:
        """Drop every reference to the current forward's tensors and graph (also those a caller still holds)."""
        self._release_calls()
        self._calls, self._nodes, self._last_cast, self._recomputed = {}, [], None, False
        self._first_layers = set()
