"""CUDA graphs for the DP step: one graph for a physical batch's forward and clipped backward, one for the noisy
optimizer step; Python runs between replays only (accounting, logging, EMA, validation).

`make_private(..., cuda_graphs=True)` prepares the optimizer: the wrapped Adam/AdamW becomes capturable (its lr a
device tensor, so that an lr schedule reaches the graph), and after WARMUP_STEPS eager noisy steps the next one is
captured (noise from the secret generator, registered with the graph so that every replay draws fresh noise, then
all-reduce and the wrapped step) and replayed from then on; captured again if the wrapped optimizer's numbers change.
The finite check reads its flag before each replay and the accountant's hook runs after it, in Python.

`CudaGraphedStep(physical_step)` does the same for `physical_step(*tensors) -> DPLoss` (forward and
criterion; its backward is captured with it): WARMUP_STEPS eager calls on a side stream, then one capture, then
replays into the same static tensors. It needs inputs of one shape, which masked physical batches of exactly
`max_physical_batch_size` rows give; random draws inside it must come from torch's default CUDA generator, which
graphs advance per replay. Autocast inside it must not cache casts (`torch.autocast(..., cache_enabled=False)`).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable

import torch

from ..clipping.losses import DPLoss
from ..errors import UserError

WARMUP_STEPS = 3  # eager steps before a capture (PyTorch's guidance: a few, on a side stream)
# torch.utils.checkpoint rewinds the CUDA generator, which a capture refuses before torch 2.10 (pytorch#162504)
CHECKPOINTING_CAPTURABLE = torch.torch_version.TorchVersion(torch.__version__) >= "2.10"
RECAPTURE_WARNING = 10  # captures of the noisy step in a row that earn a warning


def check_cuda_graphs(module: torch.nn.Module, grad_sample_mode: str, generator: torch.Generator | None) -> None:
    """Refuse, naming the reason, what cannot be captured here."""
    check_cuda_device("cuda_graphs", "run without it (--no_cuda_graphs)")
    if not hasattr(torch.cuda.CUDAGraph, "register_generator_state"):
        raise UserError(
            f"cuda_graphs needs torch.cuda.CUDAGraph.register_generator_state (torch >= 2.5; this is "
            f"{torch.__version__}) to draw fresh secret noise in every replay: upgrade torch or turn cuda_graphs off."
        )
    if grad_sample_mode not in ("flash_bk", "flash"):
        raise UserError(f"cuda_graphs needs grad_sample_mode flash_bk or flash, not {grad_sample_mode}.")
    if getattr(module, "is_gradient_checkpointing", False) and not CHECKPOINTING_CAPTURABLE:
        raise UserError(
            f"cuda_graphs with gradient checkpointing needs torch >= 2.10 (this is {torch.__version__}): upgrade "
            "torch, or turn one of them off (--no_cuda_graphs)."
        )
    if any(p.device.type != "cuda" for p in module.parameters() if p.requires_grad):
        raise UserError("cuda_graphs needs the model on the CUDA device before make_private: call model.cuda().")
    if generator is not None and generator.device.type != "cuda":
        raise UserError("cuda_graphs needs the noise generator on the CUDA device (torch.Generator('cuda')).")


def check_cuda_device(what: str, instead: str) -> None:
    if not torch.cuda.is_available():
        raise UserError(f"{what} needs a CUDA device; on CPU {instead}.")


def set_capturable(optimizer: torch.optim.Optimizer, capturable: bool) -> None:
    """Adam/AdamW (the optimizers with a `capturable` option) as a captured step needs them: step counters and the
    learning rate on the parameters' device, the lr a 0-dim tensor that a replay reads and an lr scheduler fills in
    place; or as an eager step needs them (`capturable=False`, the lr a number). Again after a load_state_dict,
    which brings back what the saving run had (an eager run's step counters on the CPU, a graphed run's flag). Any
    other optimizer's numbers are baked into the graph: `GraphedNoisyStep` captures it again when they change."""
    for group in optimizer.param_groups:
        if "capturable" not in group or not group["params"]:
            continue
        group["capturable"] = capturable
        lr, device = group["lr"], group["params"][0].device
        if not capturable:
            group["lr"] = float(lr)
            continue
        if not (isinstance(lr, torch.Tensor) and lr.device == device):
            group["lr"] = torch.tensor(float(lr), device=device)
        # torch warns once that a capturable step runs uncaptured, advising capturable=False: our eager warm-up does
        optimizer._warned_capturable_if_run_uncaptured = True
        for p in group["params"]:
            step = optimizer.state.get(p, {}).get("step")
            if isinstance(step, torch.Tensor) and step.device != p.device:
                optimizer.state[p]["step"] = step.to(p.device, torch.float32)


def capture_graph(fn: Callable[[], None], generator: torch.Generator | None = None) -> torch.cuda.CUDAGraph:
    """fn's CUDA work recorded as one graph (the capture takes no step: replay it); `generator` (not torch's default
    one) is registered with the graph so that every replay draws fresh numbers from it."""
    graph = torch.cuda.CUDAGraph()
    if generator is not None:
        graph.register_generator_state(generator)
    torch.cuda.synchronize()
    # thread_local: a DataLoader's pin-memory thread may allocate during the capture ("global" would fail it)
    with torch.cuda.graph(graph, capture_error_mode="thread_local"):
        fn()
    return graph


def hyperparameters(optimizer: torch.optim.Optimizer) -> list[dict]:
    """What a graph of the optimizer's step bakes in, per parameter group: its numbers and flags, and which tensor
    (its address) stands for each tensor-valued one (an lr tensor's value is read at every replay)."""
    return [
        {k: v.data_ptr() if isinstance(v, torch.Tensor) else v for k, v in group.items() if k != "params"}
        for group in optimizer.param_groups
    ]


class GraphedNoisyStep:
    """The DP optimizer's noisy step as a CUDA graph after WARMUP_STEPS eager ones; captured again whenever the
    wrapped optimizer's hyperparameters are no longer those of the capture (e.g. an lr schedule over SGD, whose lr
    is a number). A capture costs about an eager step: after RECAPTURE_WARNING captures in a row it warns once."""

    def __init__(self, noisy_step: Callable[[], None], generator: torch.Generator, optimizer: torch.optim.Optimizer):
        self.noisy_step, self.generator, self.optimizer = noisy_step, generator, optimizer
        self.eager_steps = 0
        self.graph: torch.cuda.CUDAGraph | None = None
        self.captured_with: list[dict] | None = None  # the hyperparameters the graph holds
        self.captures_in_a_row = 0

    def __call__(self) -> None:
        if self.eager_steps < WARMUP_STEPS:
            self.eager_steps += 1
            self.noisy_step()
            return
        if self.graph is None or hyperparameters(self.optimizer) != self.captured_with:
            self.graph = None  # the old graph's memory goes back before the new capture
            set_capturable(self.optimizer, True)
            self.captured_with = hyperparameters(self.optimizer)
            self.graph = capture_graph(self.noisy_step, self.generator)
            self.captures_in_a_row += 1
            if self.captures_in_a_row == RECAPTURE_WARNING:
                warnings.warn(
                    f"The optimizer's step was captured again in each of the last {RECAPTURE_WARNING} steps: its "
                    f"{type(self.optimizer).__name__} keeps its lr as a number, which an lr schedule changes every "
                    "step, so every step pays a capture. Use AdamW (its lr becomes a device tensor) or a constant lr, "
                    "or turn CUDA graphs off (--no_cuda_graphs).",
                    stacklevel=2,
                )
        else:
            self.captures_in_a_row = 0
        self.graph.replay()


class CudaGraphedStep:
    """`physical_step(*tensors) -> DPLoss` and its clipped backward, replayed as one CUDA graph; returns the
    per-row losses (a static tensor, overwritten by the next call)."""

    def __init__(self, physical_step: Callable[..., DPLoss]):
        if not callable(physical_step):
            raise UserError(
                f"CudaGraphedStep takes the physical step function (tensors -> the criterion's DPLoss), got "
                f"{type(physical_step).__name__}."
            )
        check_cuda_device("dp_utils.CudaGraphedStep", "call the physical step function itself")
        self.physical_step = physical_step
        self.calls = 0
        self.graph: torch.cuda.CUDAGraph | None = None
        self.static_inputs: tuple[torch.Tensor, ...] = ()
        self.static_losses: torch.Tensor | None = None
        self._side_stream = torch.cuda.Stream()

    def __call__(self, *inputs: torch.Tensor) -> torch.Tensor:
        if self.graph is not None:
            self._check_shapes(inputs)
            for static, new in zip(self.static_inputs, inputs, strict=True):
                static.copy_(new, non_blocking=True)
            self.graph.replay()
            return self.static_losses
        if not all(isinstance(x, torch.Tensor) for x in inputs):
            got = [type(x).__name__ for x in inputs]
            raise UserError(f"A graphed step takes tensors only (replayed through static copies), got {got}.")
        self.calls += 1
        if self.calls <= WARMUP_STEPS:
            return self._eager(inputs)
        self.static_inputs = tuple(x.clone() for x in inputs)
        self.graph = capture_graph(self._record)
        self.graph.replay()
        return self.static_losses

    def _record(self) -> None:
        loss = self.physical_step(*self.static_inputs)
        loss.backward()
        self.static_losses = loss.losses.detach()

    def _eager(self, inputs: tuple[torch.Tensor, ...]) -> torch.Tensor:
        """A warm-up call on a side stream (so that the capture finds the allocator and the kernels warm)."""
        self._side_stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(self._side_stream):
            loss = self.physical_step(*inputs)
            if not isinstance(loss, DPLoss):
                raise UserError(
                    "The physical step of CudaGraphedStep must return the private criterion's DPLoss "
                    f"(criterion(prediction, target, mask=mask)), not {type(loss).__name__}: the graph records its "
                    "clipped backward."
                )
            loss.backward()
            losses = loss.losses.detach()
        torch.cuda.current_stream().wait_stream(self._side_stream)
        return losses

    def _check_shapes(self, inputs: tuple[torch.Tensor, ...]) -> None:
        shapes, captured = [(x.shape, x.dtype) for x in inputs], [(x.shape, x.dtype) for x in self.static_inputs]
        if shapes != captured:
            raise UserError(
                f"A graphed step replays one shape; got {shapes}, captured {captured}. Pad every physical batch to "
                "max_physical_batch_size rows (make_private's loader does)."
            )
