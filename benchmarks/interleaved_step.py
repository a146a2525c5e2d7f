"""Step-time ratios of the modes measured in one process, their steps interleaved in blocks.

    python benchmarks/interleaved_step.py --model XL-proxy --latent_size 8 --batch_size 2 --threads 1 [--bf16]

`bench_step.py` times each mode in its own process, one after the other: on a shared machine whose speed drifts
within minutes, the ratio then measures the drift as much as the modes. Here every mode is built in one process and
the modes take turns, `--block` steps at a time, for `--rounds` rounds (the first one untimed); the first `--settle`
steps of each block are not timed either, so that the noise a DP optimizer draws ahead on a CPU worker thread for
one model never overlaps another model's timed step (bench_step.py's --steps and --warmup do not apply). Prints
each mode's median s/step and the ratio of its samples/s to non-private training's.
"""

from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.bench_step import build_model, build_parser, check_step_args, training_step  # noqa: E402
from benchmarks.profiling import prepare_process  # noqa: E402


def interleaved_times(args, device: torch.device) -> dict[str, list[float]]:
    """Seconds of every timed step, per mode."""
    steps = {}
    for mode in args.modes:
        args.mode = mode
        torch.manual_seed(0)
        steps[mode], *_ = training_step(args, build_model(args, device), device)
    times = {mode: [] for mode in steps}
    for round_index in range(args.rounds):
        for mode, step in steps.items():
            for i in range(args.block):
                start = time.perf_counter()
                step()
                elapsed = time.perf_counter() - start
                if round_index > 0 and i >= args.settle:
                    times[mode].append(elapsed)
    return times


def main(args):
    device, _ = prepare_process(args.threads, args.default_malloc)
    medians = {mode: statistics.median(t) for mode, t in interleaved_times(args, device).items()}
    base = medians.get("non_private")
    timed = (args.rounds - 1) * (args.block - args.settle)
    print(f"| mode | s/step (median of {timed}) | vs non-private |")
    print("|---|---|---|")
    for mode, seconds in medians.items():
        print(f"| {mode} | {seconds:.4f} | {base / seconds if base else float('nan'):.3f} |")


def parse_args(input_args=None):
    parser = build_parser(__doc__)
    parser.set_defaults(modes=["non_private", "flash_bk"])
    parser.add_argument("--rounds", type=int, default=12, help="Rounds of one block per mode; the first is untimed.")
    parser.add_argument("--block", type=int, default=6, help="Consecutive steps of one mode per round.")
    parser.add_argument("--settle", type=int, default=2, help="Untimed steps at the start of each block.")
    args = check_step_args(parser, parser.parse_args(input_args))
    if args.rounds < 2 or not 0 <= args.settle < args.block:
        parser.error("need --rounds >= 2 and 0 <= --settle < --block")
    return args


if __name__ == "__main__":
    main(parse_args())
