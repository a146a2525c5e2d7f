"""One DiT training step (forward, backward, optimizer step) per mode, side by side in one run.

    python benchmarks/bench_step.py --model DiT-S/2 --latent_size 16 --batch_size 16 --threads 2        # CPU proxy
    python benchmarks/bench_step.py --model DiT-S/2 --latent_size 16 --batch_size 16 --threads 2 --bf16
    python benchmarks/bench_step.py --model XL-proxy --latent_size 8 --batch_size 2 --threads 1          # host work
    python benchmarks/bench_step.py --model DiT-XL/2 --latent_size 32 --batch_size 64 --bf16            # GPU
    python benchmarks/bench_step.py --model DiT-XL/2 --latent_size 32 --batch_size 64 --bf16 --cuda_graphs

Each mode runs in its own process (clean peak memory) and loops as a training loop does (the last loss and
prediction stay bound until the next forward). The table gives samples/s and its ratio to non-private training at
the same batch; peak memory (CUDA max allocated on GPU; on CPU the peak bytes of live tensors from
`benchmarks.profiling`, beside peak RSS growth); and the matrix-multiply FLOPs of one step by operand
dtype (`MatmulFlops`), and the aten ops it dispatches (`OpCount`: the host's work, which bounds a GPU step when its
kernels are small). On CPU with --bf16 every LayerNorm computes in fp32, as CUDA autocast runs it, so that the
step sees the dtypes a GPU step sees. One JSON line per mode follows the table. On CPU every mode runs with glibc
keeping freed memory, as the trainer does (`dp_utils.training.cpu_memory`); `--default_malloc` leaves glibc's defaults.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import resource
import statistics
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import torch
from diffusers import DiTTransformer2DModel

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import dp_utils  # noqa: E402
from benchmarks.profiling import (  # noqa: E402
    MatmulFlops,
    OpCount,
    StorageTracker,
    layer_norms_in_fp32,
    prepare_process,
    step_times,
)
from dp_utils.privacy.cuda_graphs import WARMUP_STEPS  # noqa: E402
from dp_utils.training.attention import ATTENTION_BACKENDS, set_attention_backend  # noqa: E402
from dp_utils.training.model import PRESETS, disable_label_dropout, dit_from_preset  # noqa: E402

MODES = ("non_private", "flash_bk", "flash", "opacus_ghost", "opacus_hooks")


def rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2**20


PROXY = dict(num_layers=28, num_attention_heads=2, attention_head_dim=32)  # DiT-XL/2's depth, tiny width


def build_model(args, device: torch.device) -> torch.nn.Module:
    with device:  # initialised in place: a DiT-XL/2 is 675M parameters
        if args.model == "XL-proxy":
            model = DiTTransformer2DModel(
                in_channels=4, out_channels=8, sample_size=args.latent_size, patch_size=2, **PROXY
            )
        else:
            model = dit_from_preset(args.model, in_channels=4, sample_size=args.latent_size, num_classes=1000)
    model.train()
    disable_label_dropout(model)
    if args.gradient_checkpointing:
        model.enable_gradient_checkpointing()  # the trainer draws label dropout itself, once per example
    if args.attention_backend:
        set_attention_backend(model, args.attention_backend)
    return model


def training_step(args, model: torch.nn.Module, device: torch.device) -> tuple[Callable[[], None], int, int]:
    """One step of the mode as a training loop runs it (the loss and prediction stay bound until the next forward
    rebinds them); the number of trainable parameters and of frozen embedder parameters."""
    frozen = dp_utils.freeze_embedders(model) if args.mode == "opacus_ghost" else []  # the only way ghost runs
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4, weight_decay=0.0, fused=True)  # as a GPU runs it
    b, s = args.batch_size, args.latent_size
    x, noise = torch.randn(b, 4, s, s, device=device), torch.randn(b, 4, s, s, device=device)
    t, y = torch.randint(0, 1000, (b,), device=device), torch.randint(0, 1000, (b,), device=device)
    graphs = args.cuda_graphs and device.type == "cuda"
    criterion, private = dp_utils.per_sample_mse, args.mode != "non_private"
    if private:
        model, optimizer, criterion, _ = dp_utils.make_private(
            module=model,
            optimizer=optimizer,
            sample_rate=0.01,
            dataset_size=100 * b,  # an expected logical batch of b: one physical batch per step
            noise_multiplier=1.0,
            max_grad_norm=1.0,
            grad_sample_mode=args.mode,
            cuda_graphs=graphs,
        )
    state = {}

    def forward(*inputs):
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.bf16, cache_enabled=not graphs):
            state["prediction"] = model(x, timestep=t, class_labels=y).sample[:, :4]
            losses = criterion(state["prediction"], noise)  # every row real: no mask needed
        return losses

    if private and graphs:
        physical = dp_utils.CudaGraphedStep(forward)
    elif private:
        physical = lambda: forward().backward()  # noqa: E731
    else:
        physical = lambda: forward().mean().backward()  # noqa: E731

    def step():
        physical()
        optimizer.step()
        optimizer.zero_grad(set_to_none=not private)

    if graphs and not private:
        step = graphed(step, optimizer)
    return step, sum(p.numel() for p in params), len(frozen)


def graphed(step: Callable[[], None], optimizer: torch.optim.Optimizer) -> Callable[[], None]:
    """Non-private training captured whole in one CUDA graph (PyTorch's recipe: warm-up on a side stream)."""
    for group in optimizer.param_groups:
        group["capturable"] = True
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    return graph.replay


def run_mode(args) -> dict:
    """Time one mode in this process; returns its figures."""
    torch.manual_seed(0)
    device, retained = prepare_process(args.threads, args.default_malloc)
    model = build_model(args, device)
    step, trainable, frozen = training_step(args, model, device)
    gpu_layer_norms = args.bf16 and device.type == "cpu"
    with layer_norms_in_fp32(model) if gpu_layer_norms else contextlib.nullcontext():
        times, peak = timed_steps(args, step, device)
        tracked = {}
        if device.type == "cpu":  # exact bytes of live tensors over two steps (the state of the loop is live before)
            with StorageTracker() as tracker:
                step()
                step()
            tracked = dict(tensor_peak_mib=tracker.peak / 2**20, alive_after_step_mib=tracker.live / 2**20)
        counted = {}
        if not (args.cuda_graphs and device.type == "cuda"):  # a replay dispatches no op to count
            with MatmulFlops() as flops, OpCount() as ops:
                step()
            counted = dict(
                matmul_gflop={str(dtype).removeprefix("torch."): n / 1e9 for dtype, n in flops.by_dtype.items()},
                aten_ops=ops.ops,
            )
    median = statistics.median(times)
    return dict(
        mode=args.mode,
        model=args.model,
        latent_size=args.latent_size,
        batch_size=args.batch_size,
        bf16=args.bf16,
        gradient_checkpointing=args.gradient_checkpointing,
        cuda_graphs=args.cuda_graphs and device.type == "cuda",
        attention_backend=args.attention_backend or "sdpa",
        fp32_layer_norms=gpu_layer_norms,
        device=str(device) if device.type == "cpu" else torch.cuda.get_device_name(),
        s_per_step=median,
        samples_per_s=args.batch_size / median,
        peak_gib=peak,
        **tracked,
        **counted,
        frozen_params=frozen,
        malloc_retains_freed=retained,
        trainable=trainable,
    )


def timed_steps(args, step: Callable[[], None], device: torch.device) -> tuple[list[float], float]:
    """Seconds of each timed step, and the peak memory (CUDA max allocated, or RSS growth on CPU) in GiB."""
    baseline = rss_mib()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times = step_times(step, args.warmup, args.steps, device)
    if device.type == "cuda":
        return times, torch.cuda.max_memory_allocated() / 2**30
    return times, (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 - baseline) / 1024


def main(args):
    if args.mode:
        print(json.dumps(run_mode(args)))
        return
    results = []
    for mode in args.modes:
        cmd = [sys.executable, __file__, "--mode", mode] + [a for a in sys.argv[1:]]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode:
            error = (proc.stderr.strip().splitlines() or ["failed"])[-1]
            results.append(dict(mode=mode, error=error))
        else:
            results.append(json.loads(proc.stdout.strip().splitlines()[-1]))
    base = next((r for r in results if r["mode"] == "non_private" and "error" not in r), None)
    on_gpu = any(r.get("device", "cpu") != "cpu" for r in results)  # a GPU's name
    memory_key = "peak_gib" if on_gpu else "tensor_peak_mib"
    memory = "peak GiB (CUDA max allocated)" if on_gpu else "peak MiB of live tensors (RSS growth GiB)"
    print(
        f"{args.model}, latent {args.latent_size}x{args.latent_size}, batch {args.batch_size}, "
        f"{'bf16 autocast' if args.bf16 else 'fp32'}, fused AdamW"
        + (", gradient checkpointing" if args.gradient_checkpointing else "")
        + (", CUDA graphs" if any(r.get("cuda_graphs") for r in results) else "")
        + (f", attention {args.attention_backend}" if args.attention_backend else "")
        + f", median of {args.steps} steps after {args.warmup} warm-ups"
        + (", layer norms in fp32 as on CUDA" if any(r.get("fp32_layer_norms") for r in results) else "")
        + (", glibc malloc keeps freed memory" if any(r.get("malloc_retains_freed") for r in results) else "")
    )
    print(
        f"| mode | s/step | samples/s | vs non-private | {memory} | vs non-private | matmul GFLOP (fp32 share) "
        "| aten ops/step |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for r in results:
        if "error" in r:
            print(f"| {r['mode']} | {r['error'][:100]} | | | | | | |")
            continue
        r["vs_non_private"] = r["samples_per_s"] / base["samples_per_s"] if base else float("nan")
        r["memory_vs_non_private"] = r[memory_key] / base[memory_key] if base else float("nan")
        gflop = r.get("matmul_gflop")
        if gflop:
            wide = sum(v for k, v in gflop.items() if k in ("float32", "float64"))
            counts = f"{sum(gflop.values()):.1f} ({wide / sum(gflop.values()):.0%}) | {r['aten_ops']}"
        else:
            counts = "- (graph replays) | -"
        rss = "" if on_gpu else f" ({r['peak_gib']:.2f})"
        print(
            f"| {r['mode']} | {r['s_per_step']:.3f} | {r['samples_per_s']:.1f} | {r['vs_non_private']:.2f} "
            f"| {r[memory_key]:.{2 if on_gpu else 0}f}{rss} | {r['memory_vs_non_private']:.2f} | {counts} |"
        )
    for r in results:
        print(json.dumps(r))


def parse_args(input_args=None):
    parser = build_parser(__doc__)
    return check_step_args(parser, parser.parse_args(input_args))


def check_step_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> argparse.Namespace:
    """What the flags' types cannot check (also `interleaved_step.py`'s)."""
    if args.latent_size % 2:
        parser.error(f"--latent_size must be even (the DiT's patch size is 2), got {args.latent_size}.")
    if args.cuda_graphs and not torch.cuda.is_available():
        parser.error("--cuda_graphs needs a CUDA device; leave it out on CPU.")
    if args.cuda_graphs:  # time replays only: the eager steps before a capture, and the capture, are warm-ups
        args.warmup = max(args.warmup, WARMUP_STEPS + 1)
    return args


def at_least(minimum: int) -> Callable[[str], int]:
    """An argparse type: an integer >= minimum."""

    def integer(text: str) -> int:
        value = int(text)  # not an integer: argparse says "invalid integer value"
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be an integer >= {minimum}, got {text}")
        return value

    return integer


def build_parser(description: str) -> argparse.ArgumentParser:
    """The flags that say what step to time (also `interleaved_step.py`'s)."""
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--model",
        choices=[*PRESETS, "XL-proxy"],
        default="DiT-S/2",
        help="DiT preset (patch size 2); XL-proxy: DiT-XL/2's 28 blocks, 2 heads of 32 (a step bound by the host).",
    )
    parser.add_argument(
        "--latent_size", type=at_least(2), default=16, help="Latent height and width, even (32 for 256px)."
    )
    parser.add_argument("--batch_size", type=at_least(1), default=16, help="Examples per step.")
    parser.add_argument("--bf16", action="store_true", help="bf16 autocast (fp32 otherwise).")
    parser.add_argument(
        "--gradient_checkpointing", action="store_true", help="diffusers' enable_gradient_checkpointing() on the DiT."
    )
    parser.add_argument(
        "--cuda_graphs",
        action="store_true",
        help="CUDA: capture every mode's step in CUDA graphs (non-private whole; ours: dp_utils.CudaGraphedStep and "
        "make_private(cuda_graphs=True)).",
    )
    parser.add_argument("--attention_backend", choices=ATTENTION_BACKENDS, help="diffusers' attention dispatcher.")
    parser.add_argument("--steps", type=at_least(1), default=5, help="Timed steps per mode; the median is reported.")
    parser.add_argument("--warmup", type=at_least(0), default=2, help="Untimed steps before timing.")
    parser.add_argument("--threads", type=at_least(0), default=0, help="torch CPU threads (0: torch's default).")
    parser.add_argument(
        "--default_malloc", action="store_true", help="CPU: leave glibc's malloc thresholds at their defaults."
    )
    parser.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES), help="Modes to compare.")
    parser.add_argument("--mode", choices=MODES, help=argparse.SUPPRESS)  # internal: run one mode in this process
    return parser


if __name__ == "__main__":
    main(parse_args())
