"""The profiling suite: where the time and memory of DP fine-tuning go, mode by mode, as JSON lines, tables and plots.

    # CPU, small (about 10 minutes on 2 cores): two batch sizes, two modes
    python -m benchmarks.suite --models DiT-S/2 --latent_sizes 8 --batch_sizes 4 8 --modes non_private flash_bk \\
        --threads 2 --output_dir benchmarks/results/cpu-small
    # the largest physical batch per mode under a memory limit (CPU: live tensor bytes; GPU: real OOM errors)
    python -m benchmarks.suite ... --max_batch --memory_limit 1.5
    # GPU: DiT-XL/2 at 256 px in bf16 (benchmarks/gpu_suite.sh)
    python -m benchmarks.suite --models DiT-XL/2 --latent_sizes 32 --precisions bf16 --batch_sizes 16 32 64 \\
        --modes non_private flash_bk flash opacus_ghost --max_batch --output_dir benchmarks/results/gpu-xl

Every configuration (mode x preset x latent size x precision x trainable set x checkpointing x batch) runs in a fresh
process (`benchmarks.run_config`), so an out-of-memory error or a crash ends that configuration only. Each result is
appended to `results.jsonl` in --output_dir with the environment (device, torch, diffusers, opacus, commit, threads);
a rerun skips the configurations already there (errors are retried). `--max_batch` doubles the batch from the
smallest of --batch_sizes until a step fails with out of memory, then bisects; each probe is a configuration too.
Then `benchmarks.plots` draws the PNGs and writes `tables.md` beside them (`python -m benchmarks.plots DIR` redraws).
"""

from __future__ import annotations

import argparse
import itertools
import json
import subprocess
import sys
from pathlib import Path

from tqdm.auto import tqdm

from benchmarks import plots
from benchmarks.run_config import MODES, PRECISIONS
from dp_utils.training.adapters import TRAINABLE
from dp_utils.training.model import PRESETS

REPO = Path(__file__).resolve().parents[1]
GROUP_KEYS = ("model", "latent_size", "precision", "trainable", "gradient_checkpointing")
KEY = ("mode", *GROUP_KEYS, "batch_size", "memory_limit_gib")  # what identifies a configuration's result


def configurations(args) -> list[dict]:
    """The grid, as run_config's settings."""
    grid = itertools.product(
        args.models, args.latent_sizes, args.precisions, args.trainable, args.gradient_checkpointing, args.modes
    )
    return [
        dict(
            model=model,
            latent_size=latent,
            precision=precision,
            trainable=trainable,
            gradient_checkpointing=checkpointing == "on",
            mode=mode,
        )
        for model, latent, precision, trainable, checkpointing, mode in grid
    ]


def key_of(record: dict) -> tuple:
    return tuple(record.get(k) for k in KEY)


def load_results(path: Path) -> list[dict]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


class Suite:
    """Runs configurations in fresh processes, appending every result; reuses the ones already in the file."""

    def __init__(self, args):
        self.args = args
        self.path = Path(args.output_dir) / "results.jsonl"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.done = {key_of(r): r for r in load_results(self.path) if r.get("kind", "run") == "run"}
        self.done = {k: r for k, r in self.done.items() if r["status"] in ("ok", "oom")}
        self._on_cpu = args.cpu or not _cuda_available()

    def run(self, config: dict, batch_size: int, memory_limit: float | None = None, steps: int | None = None) -> dict:
        settings = dict(config, batch_size=batch_size, memory_limit_gib=memory_limit)
        key = key_of(settings)
        unlimited = self.done.get(key_of(dict(settings, memory_limit_gib=None)))
        if memory_limit and self._on_cpu and unlimited and unlimited["status"] == "ok":
            if unlimited["peak_mib"] <= memory_limit * 1024:  # the limit bounds the same live bytes: it fits
                return unlimited
        if key not in self.done:
            self.done[key] = self._append(dict(kind="run", **self._run_process(settings, steps)))
        return self.done[key]

    def _run_process(self, settings: dict, steps: int | None) -> dict:
        args = self.args
        steps, warmup = (args.steps, args.warmup) if steps is None else (steps, 0)
        cmd = [sys.executable, "-m", "benchmarks.run_config", "--steps", str(steps), "--warmup", str(warmup)]
        cmd += ["--threads", str(args.threads)] + (["--cpu"] if args.cpu else [])
        for name, value in settings.items():
            if value is True:
                cmd.append(f"--{name}")
            elif value not in (None, False):
                cmd += [f"--{name}", str(value)]
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, timeout=args.timeout)
        except subprocess.TimeoutExpired:
            return dict(settings, status="timeout", error=f"more than {args.timeout} s")
        lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
        if lines:
            return json.loads(lines[-1])
        # killed from outside (the kernel's OOM killer sends SIGKILL) or crashed before its record
        status = "oom" if proc.returncode == -9 else "error"
        error = (proc.stderr.strip().splitlines() or [f"exit code {proc.returncode}"])[-1]
        return dict(settings, status=status, error=error[:300])

    def _append(self, record: dict) -> dict:
        with self.path.open("a") as file:
            file.write(json.dumps(record) + "\n")
        return record

    def largest_batch(self, config: dict, start: int, cap: int, memory_limit: float | None) -> dict:
        """Double from `start` until a step fails, then bisect: the largest batch that ran, and why the next failed."""
        fits, failed, stopped_by, best = 0, None, "cap", {}
        batch = start
        while batch <= cap:
            record = self.run(config, batch, memory_limit, self.args.probe_steps)
            if record["status"] != "ok":
                failed, stopped_by = batch, record["status"]
                break
            fits, best, batch = batch, record, batch * 2
        while failed is not None and failed - fits > 1:
            middle = (fits + failed) // 2
            record = self.run(config, middle, memory_limit, self.args.probe_steps)
            if record["status"] == "ok":
                fits, best = middle, record
            else:
                failed = middle
        summary = dict(
            kind="max_batch", **config, memory_limit_gib=memory_limit, max_batch=fits, stopped_by=stopped_by
        )
        summary.update({k: best.get(k) for k in ("samples_per_s", "peak_mib", "device_name")})
        existing = [r for r in load_results(self.path) if r.get("kind") == "max_batch"]
        if summary not in existing:
            self._append(summary)
        return summary


def main(args):
    suite = Suite(args)
    grid = configurations(args)
    total = len(grid) * len(args.batch_sizes) + (len(grid) if args.max_batch else 0)
    with tqdm(total=total, unit="config", desc="suite") as bar:
        for config in grid:
            for batch in args.batch_sizes:
                bar.set_postfix_str(f"{config['mode']} {config['model']} batch {batch}")
                suite.run(config, batch)
                bar.update()
            if args.max_batch:
                bar.set_postfix_str(f"{config['mode']} {config['model']} largest batch")
                suite.largest_batch(config, min(args.batch_sizes), args.max_batch_cap, args.memory_limit)
                bar.update()
    if not args.no_plots:
        for path in plots.draw_all(suite.path.parent):
            print(path)


def parse_args(input_args=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES), help="Default: all.")
    parser.add_argument("--models", nargs="+", choices=PRESETS, default=["DiT-S/2"], help="Default: DiT-S/2.")
    parser.add_argument("--batch_sizes", nargs="+", type=int, default=[4, 8], help="Physical batches. Default: 4 8.")
    parser.add_argument(
        "--latent_sizes", nargs="+", type=int, default=[32], help="Latent sides (32: 256 px, 64: 512 px). Default: 32."
    )
    parser.add_argument("--precisions", nargs="+", choices=PRECISIONS, default=["fp32"], help="Default: fp32.")
    parser.add_argument("--trainable", nargs="+", choices=TRAINABLE, default=["full"], help="Default: full.")
    parser.add_argument(
        "--gradient_checkpointing", nargs="+", choices=["off", "on"], default=["off"], help="Default: off."
    )
    parser.add_argument("--steps", type=int, default=3, help="Timed steps per configuration (median). Default: 3.")
    parser.add_argument("--warmup", type=int, default=1, help="Untimed steps before timing. Default: 1.")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default). Default: 0.")
    parser.add_argument("--cpu", action="store_true", help="Run on CPU even where a GPU is available.")
    parser.add_argument("--max_batch", action="store_true", help="Also find the largest batch per mode.")
    parser.add_argument(
        "--memory_limit", type=float, help="GiB a step may use (required on CPU with --max_batch; GPU: its memory)."
    )
    parser.add_argument(
        "--probe_steps",
        type=int,
        default=1,
        help="Timed steps of each --max_batch probe, no warm-up (its memory is measured before). Default: 1.",
    )
    parser.add_argument("--max_batch_cap", type=int, default=4096, help="Largest batch tried. Default: 4096.")
    parser.add_argument("--timeout", type=float, default=1800, help="Seconds per configuration. Default: 1800.")
    parser.add_argument("--output_dir", default="benchmarks/results", help="Default: benchmarks/results.")
    parser.add_argument("--no_plots", action="store_true", help="Only the JSON lines.")
    args = parser.parse_args(input_args)
    if args.max_batch and args.memory_limit is None and (args.cpu or not _cuda_available()):
        parser.error("--max_batch on CPU needs --memory_limit (GiB): the CPU has no out-of-memory error to find")
    if min(args.batch_sizes) < 1 or (args.memory_limit is not None and args.memory_limit <= 0):
        parser.error("--batch_sizes must be >= 1 and --memory_limit > 0")
    return args


def _cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


if __name__ == "__main__":
    main(parse_args())
