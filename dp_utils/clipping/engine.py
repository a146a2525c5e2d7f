"""The clipping engine: exact per-example gradient norms and clipped gradient sums without per-example gradients.

Every module that owns trainable parameters records each of its calls (its forward is wrapped, `_CapturedForward`):
its input, and the edge of the autograd graph its output leaves by. The backward is one `torch.autograd.grad`
towards those edges, which hands back every layer's output gradient at once; autograd computes activation gradients
only, never parameter gradients, and no Python runs inside it. (Under activation checkpointing or offloading, and in
mode flash, each output instead passes through an identity autograd function that saves the layer input as autograd
saves any tensor, so that it is recomputed, and reports (input, output gradient) as the backward reaches it.) From
the pairs the per-layer rules give per-example norms (ghost norm or instantiation), then

    norms:  ||g_e||^2 = sum over layers of the layer's per-example squared norm    (all calls, all rows of e)
    clip:   c_e = min(1, C / (||g_e|| + rounding bound))                              (`dp_utils.clipping.precision`)
    sum:    p.grad += sum_e c_e g_e, from each layer's pairs with the output gradient scaled by its row's c_e:
            flash_bk: one backward; the pairs are kept until the clip factors are known (book-keeping)
            flash:    two backwards; the first computes norms and drops each pair at once, the second recomputes the
                      pairs and sums them as they arrive. Memory as non-private training; also what flash_bk does
                      when the forward's saved tensors go through hooks (gradient checkpointing, offloading).

Plan once, run many: the first backward (and any whose layer calls or shapes differ) builds a plan: the layers that
run as one stack (linear layers of one shape, e.g. every block's q projection: their pairs are stacked and each rule
runs once per stack, not once per layer), and the guards that walk the autograd graph. Sums go into one flat buffer
whose views are the parameters' `.grad` (`dp_utils.clipping.flat_grads`), laid out from the model alone (never from
the data, so that every rank of a multi-process run sums the same parameter's elements) such that a stack's
gradients are usually one block of it. A padding row (mask False) contributes exactly nothing: its layer inputs and
output gradients are replaced by zeros before any product, so NaN or inf in it cannot leak into a norm or a sum.

Under autocast, inputs of linear and convolution layers are cast once (shared by the layers reading one tensor, e.g.
q, k, v) to the dtype the layer computes in, so the engine keeps and multiplies what the layer itself uses.
Nothing outlives the backward: every captured tensor is released when it ends. A gradient the engine did not clip
is refused: a parameter used outside its layer, a backward not driven by the engine, a second forward before the
first one's backward. Noise is the optimizer's (`dp_utils.privacy.optimizer`), and so is the 1 / B that rides in
the clip factors (`sum_scale`).
"""

from __future__ import annotations

import contextlib
import functools
import math
import re
import weakref
from dataclasses import dataclass

import torch
from torch import nn
from torch.autograd.graph import GradientEdge

from .flat_grads import FlatGradients
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
    edge: GradientEdge | None = None  # where the output's gradient arrives (None: reported by _CatchGrad)

    def release(self) -> None:
        self.input = self.grad = self.edge = None


@dataclass
class _Plan:
    """What the backward of one set of layer calls (layers, shapes, dtypes) runs: built once, then reused."""

    stacks: list[list[nn.Module]]  # layers whose pairs are stacked and handled as one (one call each, one shape)
    singles: list[nn.Module]  # every other layer with answered calls, each on its own
    blocks: list[dict[str, torch.Tensor | None]]  # per stack: parameter name -> its (L, *shape) gradient block


class _ForwardMarker(torch.autograd.Function):
    """Identity on a model output: its node (weakly referenced) is alive while a loss computed from it can still be
    back-propagated; the engine's own references to the graph (edges) lie upstream and do not keep it alive."""

    @staticmethod
    def forward(ctx, output):
        return output.view_as(output)

    @staticmethod
    def backward(ctx, grad):
        return grad


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


class _CapturedForward:
    """Runs in place of a layer's `forward` (an instance attribute, as accelerate's and peft's wrappers are) and
    records each call; `remove()` puts the layer's own forward back. Not a forward hook: any hook sends every call
    of the module through nn.Module's slow call path, a cost per layer and step on a host-bound step. Under autocast
    (layers whose rule asks for it) the input is first cast to the dtype the layer computes in, once for all the
    layers that read it."""

    def __init__(self, engine: ClippingEngine, layer: nn.Module, cast: bool):
        self.engine, self.layer = engine, layer
        # the device whose autocast state decides the cast (the engine's buffers fix the layer's device)
        self.cast_on = next(layer.parameters()).device.type if cast else None
        self.own = layer.__dict__.get("forward")  # a wrapper some library set before us, restored by remove()
        self.forward = layer.forward
        functools.update_wrapper(self, self.forward)  # inspect.signature(layer.forward) still reads the layer's
        layer.forward = self

    def __call__(self, *args, **kwargs):
        if self.cast_on is not None and torch.is_autocast_enabled(self.cast_on):
            args = self.engine._cast_input(args)
        output = self.forward(*args, **kwargs)
        captured = self.engine._capture(self.layer, args, output)
        return output if captured is None else captured

    def remove(self) -> None:
        if self.layer.__dict__.get("forward") is self:
            if self.own is None:
                del self.layer.forward
            else:
                self.layer.forward = self.own


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


def _names(layer: nn.Module) -> list[str]:
    """The layer's trainable parameter names."""
    return [n for n, p in layer.named_parameters(recurse=False) if p.requires_grad]


def _gradient_layout(layers: dict[nn.Module, tuple[str, LayerRule]]) -> list[torch.Tensor]:
    """The trainable parameters in the order of the gradient buffer, a function of the model alone.

    Layers that can be stacked are grouped by kind (rule, trainable parameter names and shapes), and within a kind by
    role (the path with its indices dropped: `blocks.#.attn.to_q`), roles in order of first appearance; each
    parameter name of a kind is one run. A stack of the plan (same kind, same input shapes) is then one block of
    the buffer whenever it holds whole roles that lie side by side (every block's q, k, v and out projections).
    """
    kinds: dict[tuple, dict[str, list[nn.Module]]] = {}
    rest = []
    for layer, (path, rule) in layers.items():
        names = _names(layer)
        if rule.stacked_add is None:
            rest += [getattr(layer, n) for n in names]
            continue
        shapes = tuple((getattr(layer, n).shape, getattr(layer, n).dtype) for n in names)
        kind = (rule, tuple(names), shapes, getattr(layer, "padding_idx", None))
        role = re.sub(r"(^|\.)\d+(?=\.|$)", r"\1#", path)
        kinds.setdefault(kind, {}).setdefault(role, []).append(layer)
    ordered = []
    for (_, names, _, _), roles in kinds.items():
        members = [layer for role in roles.values() for layer in role]
        ordered += [getattr(layer, n) for n in names for layer in members]
    return ordered + rest


def _shape_of(x: torch.Tensor | None) -> tuple | None:
    return None if x is None else (x.shape, x.dtype)


def _saved_tensors_hooked() -> bool:
    """Whether autograd's saved tensors go through hooks now (activation checkpointing, offloading to CPU)."""
    return torch._C._autograd._top_saved_tensors_default_hooks(False) is not None


class ClippingEngine:
    """Attaches to a model in place; `backward(losses, groups)` adds sum_e c_e g_e (times `sum_scale`) to every
    trainable `.grad`."""

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
        self.nonfinite: torch.Tensor | None = None  # True once a norm was not finite; the optimizer reads, clears it
        self.tainted = False  # an unclipped gradient reached a `.grad`: the sums are unusable until zeroed
        self.sum_scale = 1.0  # the sums are of c_e g_e times this (the DP optimizer's 1 / B: no pass to scale them)
        self._param_names = {
            p: f"{path}.{n}" if path != "<root module>" else n
            for layer, (path, _) in self.layers.items()
            for n, p in layer.named_parameters(recurse=False)
            if p.requires_grad
        }
        self._frozen = [(n, p) for n, p in module.named_parameters() if p not in self._param_names]
        self._own_params = {layer: [getattr(layer, n) for n in _names(layer)] for layer in self.layers}
        self.grads = FlatGradients(_gradient_layout(self.layers))
        device = next(iter(self._param_names)).device if self._param_names else None
        self.nonfinite = None if device is None else torch.zeros((), dtype=torch.bool, device=device)
        self._plans: dict[tuple, _Plan] = {}
        self._guarded: set[tuple] = set()  # sets of calls and shapes whose graph was checked
        self._normed: set[nn.Module] = set()  # layers whose norms were streamed in this backward
        self._stacked: list[tuple] = []  # (layers, stacked inputs, stacked output gradients) kept for the sums
        self._pad: torch.Tensor | None = None  # (B,) True for a padding row, during a backward
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
            self._handles.append(_CapturedForward(self, layer, rule.autocast))
        self._handles += [p.register_post_accumulate_grad_hook(self._unclipped_gradient) for p in self._param_names]

    def detach(self) -> None:
        """Remove the hooks and forward wrappers; the model is as before."""
        for handle in self._handles:
            handle.remove()
        self._handles = []

    # forward

    def _start_forward(self, module, args):
        self._grad_forward = torch.is_grad_enabled() and self._phase is None
        if not self._grad_forward:  # evaluation, or a recompute in the backward
            return
        if any(node() is not None for node in self._nodes):
            raise RuntimeError(
                "The private model ran a second forward before the backward of the first: the engine clips one "
                "forward per backward. Call backward() on the first loss before the next forward, or drop it "
                "(`del loss`); run evaluation under torch.no_grad()."
            )
        self._release()
        self._forward += 1

    def _end_forward(self, module, args, output):
        self._last_cast, self._grad_forward = None, False

    def _cast_input(self, args: tuple) -> tuple:
        """Under autocast, the layer's input in the dtype autocast computes it in (one copy, shared)."""
        x = args[0] if args else None
        if not isinstance(x, torch.Tensor) or not x.is_floating_point() or x.dtype == torch.float64:
            return args
        dtype = torch.get_autocast_dtype(x.device.type)
        if x.dtype == dtype:
            return args
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
        if self._phase is not None:  # a checkpointed forward recomputed in the backward: same saved tensors, no call
            return _CatchGrad.apply(output, inputs[0], self.anchor(output.device), self, None)
        self._recomputed |= _saved_tensors_hooked()
        call = _Call(layer, self._forward)
        self._calls.setdefault(layer, []).append(call)
        if not inputs[0].requires_grad:
            self._first_layers.add(layer)
        if self.mode == "flash_bk" and not self._recomputed:  # keep the input; the backward asks for the edge
            call.input, call.edge = inputs[0], GradientEdge(output.grad_fn, output.output_nr)
            return None
        output = _CatchGrad.apply(output, inputs[0], self.anchor(output.device), self, call)
        self._nodes.append(weakref.ref(output.grad_fn))
        return output

    def mark_output(self, output: torch.Tensor) -> torch.Tensor:
        """The model's output, marked so that the engine sees whether its graph is still alive (the private
        criterion marks its prediction): a second forward is refused while a loss from the first can still be
        back-propagated."""
        if not (self._calls and output.requires_grad):
            return output
        output = _ForwardMarker.apply(output)
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

    def backward(self, losses: torch.Tensor, groups: RowGroups, mask: torch.Tensor | None = None) -> None:
        """Clip each example's gradient of its summed row losses to max_grad_norm; add the sum to `.grad`.

        `mask` (B,) bool, False for a padding row: that row contributes exactly nothing, whatever its values.
        """
        self._check_coverage()
        self.grads.attach()
        self.per_example_norms = None
        if losses.numel() == 0 or not self._calls:
            self._release()
            return
        calls = [c for layer_calls in self._calls.values() for c in layer_calls]
        fast = [c for c in calls if c.edge is not None]
        calls_key = tuple((id(c.layer), c.edge is None, _shape_of(c.input)) for c in calls)
        if calls_key not in self._guarded:  # a new set of calls or shapes: walk the graph once
            self._check_graph(losses, fast)
            self._guarded.add(calls_key)
        self._groups, self._terms, self._normed = groups, [], set()
        self._pad = None if mask is None else ~mask.to(losses.device, torch.bool).view(-1)
        self._two_pass = self.mode == "flash" or self._recomputed
        anchors = list(self._anchors.values()) if len(fast) < len(calls) else []
        edges = [c.edge for c in fast]
        # The last pass also reaches the parameters of layers whose input needs no gradient: autograd runs (and
        # frees) a node only on a path to what it is asked for, and nothing else would free what those layers saved
        # for their weight gradient while the caller holds the loss. Those few small gradients are discarded.
        first = [p for layer in self._first_layers for p in self._own_params[layer]]
        try:
            self._phase = "norms"  # norms of reported pairs accumulate as they arrive
            targets = anchors + edges if self._two_pass else anchors + edges + first
            grads = torch.autograd.grad(losses.sum(), targets, retain_graph=self._two_pass, allow_unused=True)
            for c, grad in zip(fast, grads[len(anchors) :], strict=False):
                c.grad = grad
            del grads  # each output gradient is then held by its call alone, and freed once stacked
            with torch.no_grad():  # the engine's own arithmetic must not build a graph on the stored activations
                plan = self._plan(calls, calls_key)
                row_coef = self._clip_factors(losses, groups, plan)
                if not self._two_pass:
                    self._book_keeping(row_coef, plan)
            if self._two_pass:
                for c in calls:  # the second pass hands every output gradient again; fast calls keep their input
                    c.grad = None
                    if c.edge is None:
                        c.input = None
                self._phase, self._row_factors = "sums", _RowFactors(row_coef)  # each layer's sum as its pairs return
                grads = torch.autograd.grad(losses.sum(), anchors + edges + first, allow_unused=True)
                with torch.no_grad():
                    for c, grad in zip(fast, grads[len(anchors) :], strict=False):
                        if grad is not None:
                            self._add_clipped(c.layer, c.input, grad)
        finally:  # nothing the engine captured outlives the backward, also when it fails
            self._phase, self._groups, self._terms, self._row_factors, self._pad = None, None, [], None, None
            self._release()

    def _plan(self, calls: list[_Call], calls_key: tuple) -> _Plan:
        """The stacks and single layers of these answered calls; built once per set of calls and shapes."""
        key = (self._two_pass, calls_key, *(_shape_of(c.grad) for c in calls))
        plan = self._plans.get(key)
        if plan is None:
            by_signature: dict[tuple, list[nn.Module]] = {}
            singles = []
            for layer, layer_calls in self._calls.items():
                answered = [c for c in layer_calls if c.grad is not None]
                if not answered or layer in self._normed:
                    continue
                rule = self.layers[layer][1]
                c = answered[0]
                # two passes: each call's sum is added as the second pass returns it, so nothing is stacked
                if rule.stacked_add is None or len(layer_calls) > 1 or c.edge is None or self._two_pass:
                    singles.append(layer)
                    continue
                trainable = tuple(p.requires_grad for p in layer.parameters(recurse=False))
                padding_idx = getattr(layer, "padding_idx", None)  # an embedding's, part of its rule
                signature = (rule, trainable, padding_idx, _shape_of(c.input), _shape_of(c.grad))
                by_signature.setdefault(signature, []).append(layer)
            stacks = [self._in_buffer_order(layers) for layers in by_signature.values() if len(layers) > 1]
            singles += [layers[0] for layers in by_signature.values() if len(layers) == 1]
            blocks = [
                {name: self.grads.block([getattr(layer, name) for layer in layers]) for name in _names(layers[0])}
                for layers in stacks
            ]
            plan = self._plans[key] = _Plan(stacks, singles, blocks)
        return plan

    def _in_buffer_order(self, layers: list[nn.Module]) -> list[nn.Module]:
        return sorted(layers, key=lambda layer: self.grads.views[getattr(layer, _names(layer)[0])].storage_offset())

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
        # two passes: norms now and the pairs dropped (the second pass hands them again); one pass keeps them
        if self._two_pass and all(c.grad is not None and c.edge is None for c in calls):
            self._terms.append(self._norms(call.layer, calls))
            self._normed.add(call.layer)
            for c in calls:
                c.release()

    def _masked(self, x: torch.Tensor) -> torch.Tensor:
        """x with its padding rows replaced by zeros (a copy; x as it is without padding)."""
        if self._pad is None:
            return x
        return x.masked_fill(self._pad.view(-1, *[1] * (x.dim() - 1)), 0)

    def _check_rows(self, layer: nn.Module, x: torch.Tensor, rows: int) -> None:
        if x.shape[0] != rows:
            raise ValueError(
                f"Module '{self.layers[layer][0]}' saw an input with {x.shape[0]} rows but the loss has "
                f"{rows}: per-example clipping needs the batch as the first dimension of every "
                "layer input, one forward per backward, and one loss per row."
            )

    def _norms(self, layer: nn.Module, calls: list[_Call]) -> NormTerms:
        """The layer's norm terms from its answered calls, whose pairs are replaced by their masked copies."""
        for c in calls:
            self._check_rows(layer, c.input, self._groups.num_rows)
            c.input, c.grad = self._masked(c.input), self._masked(c.grad)
        with _no_autocast(calls[0].grad.device.type):
            return self.layers[layer][1].norm(layer, [(c.input, c.grad) for c in calls], self._groups)

    def _stack(self, layers: list[nn.Module], stacked_inputs: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """The layers' (input, output gradient) pairs stacked along the rows as two (L * B, ...) tensors, padding
        rows zeroed; the per-call tensors are dropped. Layers reading the same inputs (q, k, v) share one stack."""
        calls = [self._calls[layer][0] for layer in layers]
        rows = self._groups.num_rows
        for layer, c in zip(layers, calls, strict=True):
            self._check_rows(layer, c.input, rows)
        key = tuple(id(c.input) for c in calls)
        inputs = stacked_inputs.get(key)
        if inputs is None:
            inputs = stacked_inputs[key] = self._zero_padding(torch.stack([c.input for c in calls]))
        grads = self._zero_padding(torch.stack([c.grad for c in calls]))
        for c in calls:
            c.release()
        return inputs.flatten(0, 1), grads.flatten(0, 1)

    def _zero_padding(self, stacked: torch.Tensor) -> torch.Tensor:
        """(L, B, ...) with its padding rows zeroed in place."""
        if self._pad is not None:
            stacked.masked_fill_(self._pad.view(1, -1, *[1] * (stacked.dim() - 2)), 0)
        return stacked

    def _clip_factors(self, losses: torch.Tensor, groups: RowGroups, plan: _Plan) -> torch.Tensor:
        """Per-row clip factor c_e(b) = min(1, C / (upper bound of ||g_e|| + 1e-6)), (B,)."""
        terms = list(self._terms)
        self._stacked, stacked_inputs = [], {}
        for layers in plan.stacks:
            inputs, grads = self._stack(layers, stacked_inputs)
            self._stacked.append((layers, inputs, grads))
            copies = len(layers)
            with _no_autocast(grads.device.type):
                stack_terms = self.layers[layers[0]][1].norm(layers[0], [(inputs, grads)], groups.stacked(copies))
            terms.append(stack_terms.fold(copies))
        for layer in plan.singles:
            terms.append(self._norms(layer, [c for c in self._calls[layer] if c.grad is not None]))
        if self._two_pass:
            self._stacked = []
        terms = NormTerms.total(terms) if terms else NormTerms(losses.new_zeros(groups.num_examples))
        if self.record_norms:
            self.per_example_norms = terms.norm_sq.sqrt()
        if self.nonfinite is None or self.nonfinite.device != terms.norm_sq.device:
            self.nonfinite = torch.zeros((), dtype=torch.bool, device=terms.norm_sq.device)
        self.nonfinite.logical_or_(~torch.isfinite(terms.norm_sq).all())  # in place: one flag, read per logical batch
        coef = (self.max_grad_norm / (terms.upper_norm() + 1e-6)).clamp(max=1.0)
        return groups.expand(coef if self.sum_scale == 1 else coef * self.sum_scale)

    def _add_clipped(self, layer: nn.Module, layer_input: torch.Tensor, grad: torch.Tensor) -> None:
        """Second pass: add one call's clipped sum; the gradient flows on unscaled, so scale a copy."""
        scaled = self._masked(grad) * self._row_factors.for_grad(grad)
        self._accumulate(layer, [(self._masked(layer_input), scaled)])

    def _book_keeping(self, row_coef: torch.Tensor, plan: _Plan) -> None:
        """p.grad += sum_b c_b g_b for every trainable parameter, from the stored inputs and output gradients."""
        factors = _RowFactors(row_coef)
        rows = row_coef.shape[0]
        stacked, self._stacked = self._stacked, []
        for index in range(len(stacked)):  # free as we go: the peak is the pairs kept, not pairs and gradients
            layers, inputs, grads = stacked[index]
            stacked[index] = None
            grads.view(len(layers), rows, *grads.shape[1:]).mul_(factors.for_grad(grads[:rows]))
            self._accumulate_stacked(layers, inputs, grads, plan.blocks[index])
            del layers, inputs, grads
        answered = {layer: [c for c in calls if c.grad is not None] for layer, calls in self._calls.items()}
        self._scale_output_grads([c for calls in answered.values() for c in calls], factors)
        for layer, calls in answered.items():
            if calls:
                self._accumulate(layer, [(c.input, c.grad) for c in calls])
            for c in calls:
                c.release()

    def _accumulate(self, layer: nn.Module, pairs: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
        with _no_autocast(pairs[0][1].device.type):
            grads = self.layers[layer][1].summed_grads(layer, pairs)
        for name, grad in grads.items():
            self.grads.views[getattr(layer, name)].add_(grad)

    def _accumulate_stacked(
        self, layers: list[nn.Module], inputs: torch.Tensor, grads: torch.Tensor, blocks: dict[str, torch.Tensor]
    ) -> None:
        """Each layer's sum into its gradient: in place into the stack's block of the buffer, or through a temporary
        block where the buffer holds none (the stack's parameters are not laid out one after another)."""
        targets = dict(blocks)
        for name, block in blocks.items():
            if block is None:
                first = self.grads.views[getattr(layers[0], name)]
                targets[name] = first.new_zeros(len(layers), *first.shape)
        with _no_autocast(grads.device.type):
            self.layers[layers[0]][1].stacked_add(layers[0], inputs, grads, targets)
        for name, block in blocks.items():
            if block is None:
                views = [self.grads.views[getattr(layer, name)] for layer in layers]
                torch._foreach_add_(views, list(targets[name].unbind(0)))

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

    def _check_graph(self, losses: torch.Tensor, fast: list[_Call]) -> None:
        """Refuse a loss that reaches a trainable parameter other than through its layer's call, e.g.
        F.linear(x, layer.weight) or a penalty on the weights: that gradient would not be clipped."""
        layer_inputs = {c.edge.node: c.input.grad_fn for c in fast}  # a recorded output's node -> its layer's input
        seen, stack = set(), [losses.grad_fn]
        while stack:
            node = stack.pop()
            if node is None or node in seen:
                continue
            seen.add(node)
            if isinstance(node, _CatchGrad._backward_cls):  # skip the layer's own ops, go on from its input
                stack.append(node.next_functions[1][0])
                continue
            if node in layer_inputs:
                stack.append(layer_inputs[node])
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
        self.tainted = True  # the optimizer refuses to step on these sums until they are zeroed
        param.grad = None  # never let an unclipped gradient reach an optimizer
        raise RuntimeError(
            f"An unclipped gradient reached '{self._param_names[param]}'.grad: a backward ran without the clipping "
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
        self._first_layers, self._normed, self._stacked = set(), set(), []
