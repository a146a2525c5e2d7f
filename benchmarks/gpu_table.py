"""The README's GPU table from bench_step.py's JSON lines (what gpu_check.sh collects in bench_xl.md).

    python benchmarks/gpu_table.py gpu-results/bench_xl.md

One row per batch size: samples/s of non-private training and of flash_bk, each eager and with CUDA graphs where
measured; flash_bk's best against the faster non-private step (the issue's bar: >= 0.9x), and flash_bk's peak memory
against that step's (<= 1.25x). Lines that are not JSON records of a finished mode (tables, errors) are skipped.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

MODES = ("non_private", "flash_bk")


def records(lines: list[str]) -> list[dict]:
    """The finished modes' records among the lines (bench_step prints one JSON line per mode)."""
    found = []
    for line in lines:
        if not line.startswith("{"):
            continue
        record = json.loads(line)
        if "samples_per_s" in record:
            found.append(record)
    return found


def table(found: list[dict]) -> str:
    """Markdown, one row per batch size; the last record of a (batch, mode, graphs) triple counts."""
    runs = {(r["batch_size"], r["mode"], bool(r["cuda_graphs"])): r for r in found}
    memory = "peak_gib" if any(r["device"] != "cpu" for r in found) else "tensor_peak_mib"  # a GPU's name
    rows = [
        "| batch | non-private eager | non-private graphs | flash_bk eager | flash_bk graphs | flash_bk best vs "
        "faster non-private | its memory vs that step's |",
        "|---|---|---|---|---|---|---|",
    ]
    for batch in sorted({b for b, _, _ in runs}):
        cells = [runs.get((batch, mode, graphs)) for mode in MODES for graphs in (False, True)]
        speeds = [f"{r['samples_per_s']:.1f}" if r else "-" for r in cells]
        baselines, ours = [r for r in cells[:2] if r], [r for r in cells[2:] if r]
        ratio = memory_ratio = "-"
        if baselines and ours:
            base = max(baselines, key=lambda r: r["samples_per_s"])
            best = max(ours, key=lambda r: r["samples_per_s"])
            ratio = f"{best['samples_per_s'] / base['samples_per_s']:.2f}"
            memory_ratio = f"{best[memory] / base[memory]:.2f}"
        rows.append(f"| {batch} | {' | '.join(speeds)} | {ratio} | {memory_ratio} |")
    return "\n".join(rows)


def main(args):
    print(table(records(Path(args.results).read_text().splitlines())))


def parse_args(input_args=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("results", help="A file holding bench_step.py's output (its JSON lines).")
    return parser.parse_args(input_args)


if __name__ == "__main__":
    main(parse_args())
