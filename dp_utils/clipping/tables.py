"""Capture for a bare parameter added to a per-example tensor by broadcasting: PixArt's and Sana's scale_shift_table.

A PixArt block computes `table[None] + t` with t (B, 6, D) from the timestep, and the model's last layer
`table[None] + e[:, None]` with e (B, D). Example b's gradient of the table is then the gradient G_b of that sum,
summed over broadcast dimensions: the table's rule is a bias' rule on G. The gradient of t alone would not do: where
the addition broadcasts t (the last layer), its gradient is already summed over the table's rows.

During a training forward the module reads, in place of its parameter, a copy of it tied to the engine's anchor and
not to the parameter: no gradient reaches the parameter but the engine's, and the engine's backward runs every node
between the loss and that copy. After the forward, the autograd graph the module built is searched for the
additions that use the copy (through leading unsqueezes and dtype casts only); each becomes one call, whose output
gradient G reaches the engine through a hook on that node. Any other use of the table is refused before a backward.
"""

from __future__ import annotations

import torch
from torch import nn

# Nodes between the table and the addition that keep its elements where broadcasting expects them.
_PASS_THROUGH = {"ToCopyBackward0"}
_ADD = "AddBackward0"


class _TableCopy(torch.autograd.Function):
    """The parameter's values, tied to the anchor only: gradients stop here (the engine has them from the sums)."""

    @staticmethod
    def forward(ctx, values, anchor):
        return values.view_as(values)

    @staticmethod
    def backward(ctx, grad):
        return None, None


class TableCapture:
    """Hooks for one module whose own trainable parameters are tables added by broadcasting."""

    def __init__(self, engine, module: nn.Module, names: tuple[str, ...]):
        self.engine, self.module = engine, module
        self.names = [n for n in names if getattr(module, n, None) is not None and getattr(module, n).requires_grad]
        self.copies: dict[str, torch.Tensor] = {}
        self.params: dict[str, nn.Parameter] = {}

    def attach(self) -> list:
        return [
            self.module.register_forward_pre_hook(self.swap_in),
            self.module.register_forward_hook(self.swap_out, always_call=True),
        ]

    def swap_in(self, module, args):
        if not torch.is_grad_enabled():
            return
        for name in self.names:
            param = module._parameters[name]
            copy = _TableCopy.apply(param.detach(), self.engine.anchor(param.device))
            self.params[name], self.copies[name] = param, copy
            module._parameters[name] = copy  # what `self.<name>` reads in the forward; restored right after it

    def swap_out(self, module, args, output):
        copies, self.copies = self.copies, {}
        for name, param in self.params.items():
            module._parameters[name] = param
        self.params = {}
        if not copies or self.engine._phase is not None:  # evaluation, or a recompute in the backward
            return
        for name, copy in copies.items():
            for node in _uses(copy, output, f"{type(module).__name__}.{name}"):
                call = self.engine.new_call(module)
                node.register_prehook(lambda grads, call=call: self.engine._on_grad(call, grads[0], grads[0]))


def table_capture(names: tuple[str, ...]):
    """A `LayerRule.capture` for modules owning the tables `names`."""

    def attach(engine, module: nn.Module) -> list:
        return TableCapture(engine, module, names).attach()

    return attach


def _tensors(output) -> list[torch.Tensor]:
    """The tensors of a module's output (a tensor, a tuple, or a diffusers output dataclass)."""
    if isinstance(output, torch.Tensor):
        return [output]
    values = output.values() if isinstance(output, dict) else output if isinstance(output, list | tuple) else ()
    return [t for v in values for t in _tensors(v)]


def _uses(copy: torch.Tensor, output, name: str) -> list:
    """The addition nodes that use `copy` in the graph from `output`; raises for any other use."""
    start = copy.grad_fn._sequence_nr()
    users: dict = {}  # node -> the nodes (created in this forward) that take its output
    stack, seen = [t.grad_fn for t in _tensors(output) if t.grad_fn is not None], set()
    while stack:
        node = stack.pop()
        if node in seen:
            continue
        seen.add(node)
        for child, _ in node.next_functions:
            if child is not None and child._sequence_nr() >= start:
                users.setdefault(child, []).append(node)
                stack.append(child)
    adds, frontier, visited = {}, [copy.grad_fn], set()
    while frontier:
        node = frontier.pop()
        for user in users.get(node, []):
            if user in visited:  # one node taking the table twice (x + x) is one use
                continue
            visited.add(user)
            if user.name() in _PASS_THROUGH or _leading_unsqueeze(user):
                frontier.append(user)
            elif user.name() == _ADD and user._saved_alpha == 1 and len(user._input_metadata[0].shape) > copy.dim():
                adds[user] = None
            else:
                raise ValueError(
                    f"'{name}' is used by {user.name()} in the forward; per-example clipping covers it only when it "
                    "is added to a tensor with the batch as its first dimension (table[None] + x)."
                )
    return list(adds)


def _leading_unsqueeze(node) -> bool:
    return node.name() == "UnsqueezeBackward0" and node._saved_dim == 0
