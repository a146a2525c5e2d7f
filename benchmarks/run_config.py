"""One configuration of the suite in this process: time a DiT training step and break its memory down; one JSON line.

    python -m benchmarks.run_config --mode flash_bk --model DiT-S/2 --latent_size 8 --batch_size 4 --threads 2

`benchmarks.suite` runs each configuration through this module in a fresh process, so that an out-of-memory error or
a crash ends that configuration only. The memory of one step, after the warm-up that creates the optimizer state,
is the composition of its peak (the highest total of live tensors over the forward, backward and optimizer step):

    parameters, optimizer_state   what lives between steps
    activations                   tensors the forward allocated that are still alive at the peak (kept for backward)
    gradients                     the trainable parameters' .grad, as far as allocated at the peak
    backward_extra                other tensors the backward allocated, alive at the peak: activation gradients in
                                  flight and what per-example clipping holds (flash_bk: every layer's output
                                  gradient until the clip factors are known, Gram matrices; Opacus: per-example
                                  gradients)
    optimizer_step                the optimizer's temporaries, where the peak falls in its step

The parts sum to the peak exactly. They come from `benchmarks.profiling.StorageTracker` (every tensor storage, no
allocator rounding or caching) on any device; on GPU the CUDA allocator's figures come beside them:
`allocator_peak_mib` (max_memory_allocated), `allocator_reserved_mib` (max_memory_reserved) and
`allocator_activations_mib` (memory_allocated's growth over the forward). `--memory_limit_gib` makes a step fail as
out of memory ("oom") above that many GiB: on CPU when the live tensors exceed it, on GPU through
torch.cuda.set_per_process_memory_fraction, as a smaller GPU would.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import platform
import statistics
import subprocess
from pathlib import Path

import diffusers
import opacus
import torch

import dp_utils
from benchmarks.profiling import StorageTracker, layer_norms_in_fp32, prepare_process, step_times
from dp_utils.training.adapters import LORA_TARGET_MODULES, TRAINABLE, lora_config, select_trainable
from dp_utils.training.model import PRESETS, disable_label_dropout, dit_from_preset

MODES = ("non_private", "flash_bk", "flash", "opacus_ghost", "opacus_hooks")
PRECISIONS = ("fp32", "bf16")
LORA_RANK = 4  # the trainer's default
MIB = 2**20
REPO = Path(__file__).resolve().parents[1]


class MemoryLimitExceeded(RuntimeError):
    """The CPU counterpart of torch.cuda.OutOfMemoryError under --memory_limit_gib."""


class PeakTracker(StorageTracker):
    """Live tensor bytes plus `base` bytes allocated before, and what was alive at the peak, by the phase of the step
    that allocated it; raises MemoryLimitExceeded once the total exceeds `limit`."""

    def __init__(self, base: int, limit: float | None = None):
        super().__init__()
        self.base, self.limit = base, limit
        self.phase = "forward"
        self._clock = 0  # counts allocations and frees: the order of events
        self._peak_time = 0
        self._records: dict[int, list] = {}  # live storage -> [bytes, phase, allocated at, freed at]
        self._history: list[list] = []

    def _track(self, storage: torch.UntypedStorage) -> None:
        self._clock += 1
        record = [storage.nbytes(), self.phase, self._clock, None]
        self._records[storage._cdata] = record
        self._history.append(record)
        peak = self.peak
        super()._track(storage)
        if self.peak > peak:
            self._peak_time = self._clock
        if self.limit is not None and self.base + self.live > self.limit:
            raise MemoryLimitExceeded(f"more than {self.limit / 2**30:.2f} GiB of live tensors")

    def _free(self, key: int) -> None:
        self._clock += 1
        record = self._records.pop(key, None)
        if record is not None:
            record[3] = self._clock
        super()._free(key)

    def mark(self, tensors, phase: str) -> None:
        """Attribute the storages of `tensors` (e.g. the gradients) to `phase`."""
        for t in tensors:
            record = self._records.get(t.untyped_storage()._cdata)
            if record is not None:
                record[1] = phase

    def at_peak(self) -> dict[str, int]:
        """Bytes alive at the peak, by phase (the `base` excluded)."""
        alive: dict[str, int] = {}
        for size, phase, allocated, freed in self._history:
            if allocated <= self._peak_time and (freed is None or freed > self._peak_time):
                alive[phase] = alive.get(phase, 0) + size
        return alive


def tensor_bytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors if isinstance(t, torch.Tensor))


def environment(device: torch.device) -> dict:
    """What the figures depend on: the device, the libraries, the code, the threads."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    else:
        cpuinfo = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
        model = next((line.split(":", 1)[1].strip() for line in cpuinfo.splitlines() if "model name" in line), "")
        name = (model or platform.processor()) + (" (avx512_bf16)" if "avx512_bf16" in cpuinfo else "")
    git = ["git", "-C", str(REPO)]
    commit = subprocess.run([*git, "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    dirty = subprocess.run([*git, "status", "--porcelain", "--untracked-files=no"], capture_output=True, text=True)
    return dict(
        device_name=name,
        torch=torch.__version__,
        diffusers=diffusers.__version__,
        opacus=opacus.__version__,
        commit=commit + ("+dirty" if dirty.stdout.strip() else ""),
        threads=torch.get_num_threads(),
    )


def build(args, device: torch.device):
    """The model with its trainable set, optimizer and criterion, made private for the private modes."""
    with device:
        model = dit_from_preset(args.model, in_channels=4, sample_size=args.latent_size, num_classes=1000)
    model.train()
    disable_label_dropout(model)
    lora = lora_config(LORA_RANK, None, LORA_TARGET_MODULES) if args.trainable == "lora" else None
    select_trainable(model, args.trainable, train_embedders=args.trainable == "full", lora=lora)  # the trainer's
    if args.gradient_checkpointing:
        model.enable_gradient_checkpointing()
    if args.mode == "opacus_ghost":
        dp_utils.freeze_embedders(model)  # Opacus' ghost clipping refuses the reused embedder otherwise
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4, weight_decay=0.0)
    criterion = dp_utils.per_sample_mse
    if args.mode != "non_private":
        data = torch.utils.data.TensorDataset(torch.arange(args.batch_size))
        model, optimizer, criterion, _ = dp_utils.make_private(
            module=model,
            optimizer=optimizer,
            data_loader=torch.utils.data.DataLoader(data, batch_size=args.batch_size),
            noise_multiplier=1.0,
            max_grad_norm=1.0,
            grad_sample_mode=args.mode,
            poisson_sampling=False,
        )
    return model, optimizer, criterion, params


def measure(args, device: torch.device) -> dict:
    """Warm up, break one step's memory down, then time `args.steps` steps."""
    torch.manual_seed(0)
    model, optimizer, criterion, params = build(args, device)
    b, s = args.batch_size, args.latent_size
    x, noise = torch.randn(b, 4, s, s, device=device), torch.randn(b, 4, s, s, device=device)
    t, y = torch.randint(0, 1000, (b,), device=device), torch.randint(0, 1000, (b,), device=device)
    bf16 = args.precision == "bf16"

    def forward():
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            prediction = model(x, timestep=t, class_labels=y).sample[:, :4]
            return criterion(prediction, noise)

    def backward(loss):
        (loss.mean() if args.mode == "non_private" else loss).backward()

    def step():
        backward(forward())
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    limit = args.memory_limit_gib * 2**30 if args.memory_limit_gib and device.type == "cpu" else None
    model_bytes = tensor_bytes(model.parameters())
    with layer_norms_in_fp32(model) if bf16 and device.type == "cpu" else contextlib.nullcontext():
        with PeakTracker(model_bytes, limit):  # the first step creates the optimizer state: under the limit too
            step()
        state_bytes = tensor_bytes(v for state in optimizer.state.values() for v in state.values())
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        with PeakTracker(model_bytes + state_bytes, limit) as tracker:
            before = torch.cuda.memory_allocated(device) if device.type == "cuda" else 0
            loss = forward()
            after = torch.cuda.memory_allocated(device) if device.type == "cuda" else 0
            tracker.phase = "backward"
            backward(loss)
            tracker.mark([p.grad for p in params if p.grad is not None], "gradients")
            del loss
            tracker.phase = "optimizer"
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        if device.type == "cuda":  # the allocator's view: its peak, its reserve, the forward's growth
            allocator = dict(
                allocator_peak=torch.cuda.max_memory_allocated(device),
                allocator_reserved=torch.cuda.max_memory_reserved(device),
                allocator_activations=after - before,
            )
        times = step_times(step, args.warmup, args.steps, device)
    median = statistics.median(times)
    at_peak = tracker.at_peak()
    memory = dict(
        parameters=model_bytes,
        optimizer_state=state_bytes,
        activations=at_peak.get("forward", 0),
        gradients=at_peak.get("gradients", 0),
        backward_extra=at_peak.get("backward", 0),
        optimizer_step=at_peak.get("optimizer", 0),
        peak=tracker.base + tracker.peak,
    )
    if device.type == "cuda":
        memory.update(allocator)
    return dict(
        s_per_step=median,
        samples_per_s=b / median,
        trainable_parameters=sum(p.numel() for p in params),
        **{f"{k}_mib": v / MIB for k, v in memory.items()},
    )


def run(args) -> dict:
    """The JSON record of one configuration: its settings, the environment, and status ok, oom or error."""
    device, _ = prepare_process(args.threads, args.default_malloc, cpu=args.cpu)
    if device.type == "cuda" and args.memory_limit_gib:
        total = torch.cuda.get_device_properties(device).total_memory
        torch.cuda.set_per_process_memory_fraction(min(args.memory_limit_gib * 2**30 / total, 1.0), device)
    record = {key: getattr(args, key) for key in CONFIG_KEYS}
    record.update(environment(device), device=device.type)
    try:
        record.update(measure(args, device), status="ok")
    except (torch.cuda.OutOfMemoryError, MemoryLimitExceeded) as error:
        record.update(status="oom", error=str(error).splitlines()[0][:300])
    except RuntimeError as error:  # a limit reached inside autograd's engine arrives wrapped
        oom = isinstance(error.__cause__, MemoryLimitExceeded) or "out of memory" in str(error).lower()
        oom = oom or "MemoryLimitExceeded" in str(error) or "GiB of live tensors" in str(error)
        record.update(status="oom" if oom else "error", error=str(error).splitlines()[0][:300])
    return record


CONFIG_KEYS = (
    "mode",
    "model",
    "latent_size",
    "batch_size",
    "precision",
    "trainable",
    "gradient_checkpointing",
    "steps",
    "warmup",
    "memory_limit_gib",
)


def parse_args(input_args=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mode", choices=MODES, required=True, help="non_private or a grad_sample_mode.")
    parser.add_argument("--model", choices=PRESETS, default="DiT-S/2", help="DiT preset. Default: DiT-S/2.")
    parser.add_argument("--latent_size", type=int, default=32, help="Latent side (32: 256 px). Default: 32.")
    parser.add_argument("--batch_size", type=int, default=8, help="Physical batch. Default: 8.")
    parser.add_argument("--precision", choices=PRECISIONS, default="fp32", help="bf16: autocast. Default: fp32.")
    parser.add_argument(
        "--trainable", choices=TRAINABLE, default="full", help=f"LoRA rank {LORA_RANK}. Default: full."
    )
    parser.add_argument("--gradient_checkpointing", action="store_true", help="diffusers' activation checkpointing.")
    parser.add_argument("--steps", type=int, default=3, help="Timed steps (the median is reported). Default: 3.")
    parser.add_argument("--warmup", type=int, default=1, help="Untimed steps after the measured one. Default: 1.")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default).")
    parser.add_argument("--memory_limit_gib", type=float, help="Fail as out of memory above this many GiB.")
    parser.add_argument("--cpu", action="store_true", help="Run on CPU even where a GPU is available.")
    parser.add_argument("--default_malloc", action="store_true", help="CPU: leave glibc's malloc thresholds alone.")
    return parser.parse_args(input_args)


if __name__ == "__main__":
    print(json.dumps(run(parse_args())), flush=True)
