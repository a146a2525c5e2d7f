"""Exact, noise-free measures of a training step on any device: bytes of live tensors and matmul FLOPs by dtype.

- `StorageTracker` counts the bytes of every tensor storage allocated while it is active, for as long as the storage
  lives, and records the peak: what a caching allocator would need at least, without its rounding or caching.
- `MatmulFlops` counts the FLOPs of every matrix multiply (torch's flop formulas per aten op) by operand dtype.
- `OpCount` counts the aten ops a step dispatches, by name: the host's share of a step (each costs Python and dispatch
  time, and most launch a kernel on a GPU), and the ops that make a GPU's host wait for the device (`host_syncs`),
  measured exactly on any machine.
- `prepare_process` sets up a benchmark process as the trainer runs: torch's threads, the device, glibc's malloc.
- `layer_norms_in_fp32` makes a CPU autocast step see what a CUDA one sees: CUDA autocast runs layer_norm in fp32
  (its output, hence the next layer's input, is fp32); CPU autocast keeps the input's dtype.
"""

from __future__ import annotations

import contextlib
import time
import types
import weakref
from collections import Counter, defaultdict
from collections.abc import Callable, Iterator

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten
from torch.utils.flop_counter import flop_registry

from dp_utils.training.cpu_memory import retain_freed_memory


class StorageTracker(TorchDispatchMode):
    """Live bytes of the storages allocated under this mode (outputs that alias an input are not allocations).

    `live` is the current total, `peak` the highest since the last `reset_peak()`; `alive()` lists what is still held.
    """

    def __init__(self):
        super().__init__()
        self.live = 0
        self.peak = 0
        self._sizes: dict[int, int] = {}  # storage id -> bytes, while the storage lives

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {_storage_key(t) for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)}
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor) and t.device.type != "meta":
                key = _storage_key(t)
                if key not in inputs and key not in self._sizes:
                    self._track(t.untyped_storage())
        return out

    def _track(self, storage: torch.UntypedStorage) -> None:
        key, size = storage._cdata, storage.nbytes()
        self._sizes[key] = size
        self.live += size
        self.peak = max(self.peak, self.live)
        weakref.finalize(storage, self._free, key)

    def _free(self, key: int) -> None:
        self.live -= self._sizes.pop(key, 0)

    def reset_peak(self) -> None:
        self.peak = self.live

    def alive(self) -> int:
        """Bytes allocated under this mode that are still alive."""
        return self.live


def _storage_key(t: torch.Tensor) -> int:
    return t.untyped_storage()._cdata


class MatmulFlops(TorchDispatchMode):
    """FLOPs of matrix multiplies (mm, bmm, addmm, baddbmm, convolutions, attention, ...) keyed by operand dtype."""

    def __init__(self):
        super().__init__()
        self.by_dtype: dict[torch.dtype, int] = defaultdict(int)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        count = flop_registry.get(func._overloadpacket)
        if count is not None:
            if func._overloadname == "dtype":  # mm/bmm with out_dtype: the formula takes the operands alone
                args, kwargs = args[:2], {}
            shapes = _shapes((args, kwargs))
            flops = count(*shapes[0], **shapes[1], out_val=_shapes(out))
            operand = next(t for t in tree_flatten(args)[0] if isinstance(t, torch.Tensor) and t.is_floating_point())
            self.by_dtype[operand.dtype] += flops
        return out

    @property
    def total(self) -> int:
        return sum(self.by_dtype.values())

    def fraction(self, *dtypes: torch.dtype) -> float:
        """Share of all counted FLOPs whose operands have one of `dtypes`."""
        return sum(self.by_dtype[d] for d in dtypes) / max(self.total, 1)


# Ops whose CUDA kernels hand a device value to the host (item(), bool(), data-dependent output shapes): the host
# waits for every queued kernel before it can go on. "index_by_mask" is x[mask] with a boolean mask (a nonzero).
HOST_SYNC_OPS = frozenset(
    {
        "_local_scalar_dense",
        "nonzero",
        "masked_select",
        "index_by_mask",
        "repeat_interleave",  # with tensor repeats; counted also where output_size spares the wait
        "_unique2",
        "unique_dim",
        "unique_consecutive",
        "equal",
    }
)


class OpCount(TorchDispatchMode):
    """The aten ops dispatched while active, by name (views and metadata ops included: each is a host call)."""

    def __init__(self):
        super().__init__()
        self.by_name: Counter[str] = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if name == "index" and any(i is not None and i.dtype == torch.bool for i in args[1]):
            name = "index_by_mask"
        self.by_name[name] += 1
        return func(*args, **(kwargs or {}))

    @property
    def ops(self) -> int:
        return sum(self.by_name.values())

    def host_syncs(self) -> dict[str, int]:
        """The ops counted that make a GPU's host wait for the device, by name."""
        return {name: n for name, n in self.by_name.items() if name in HOST_SYNC_OPS}


def _shapes(tree):
    """The flop formulas take shapes where the op took tensors."""
    return torch.utils._pytree.tree_map(lambda x: x.shape if isinstance(x, torch.Tensor) else x, tree)


@contextlib.contextmanager
def layer_norms_in_fp32(model: nn.Module) -> Iterator[None]:
    """Every nn.LayerNorm of `model` computes and returns fp32 under autocast, as CUDA autocast does."""

    def fp32_forward(module: nn.LayerNorm, x: torch.Tensor) -> torch.Tensor:
        weight, bias = (None if p is None else p.float() for p in (module.weight, module.bias))
        with torch.autocast(x.device.type, enabled=False):
            return nn.functional.layer_norm(x.float(), module.normalized_shape, weight, bias, module.eps)

    norms = [m for m in model.modules() if isinstance(m, nn.LayerNorm)]
    for norm in norms:
        norm.forward = types.MethodType(fp32_forward, norm)
    try:
        yield
    finally:
        for norm in norms:
            del norm.forward


def step_times(step: Callable[[], None], warmup: int, steps: int, device: torch.device) -> list[float]:
    """Seconds of each of `steps` calls of `step` after `warmup` untimed ones (CUDA synchronised around each)."""
    times = []
    for i in range(warmup + steps):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        if i >= warmup:
            times.append(time.perf_counter() - start)
    return times


def prepare_process(threads: int, default_malloc: bool, cpu: bool = False) -> tuple[torch.device, bool]:
    """The device to time on (CUDA where available, unless `cpu`), with torch's threads set (0: torch's default)
    and, on CPU, glibc keeping freed memory between steps as the trainer does (unless `default_malloc`); whether
    it does."""
    if threads:
        torch.set_num_threads(threads)
    device = torch.device("cuda" if torch.cuda.is_available() and not cpu else "cpu")
    return device, device.type == "cpu" and not default_malloc and retain_freed_memory()
