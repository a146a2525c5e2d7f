"""Plots and tables of a suite's results.jsonl: throughput and peak memory against batch per mode, the largest batch
per mode, and the memory breakdown as stacked bars; one set per configuration group (preset, latent size, precision,
trainable set, checkpointing, device).

    python -m benchmarks.plots benchmarks/results/cpu-small      # redraw the PNGs and tables.md from results.jsonl
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

MODE_STYLE = {  # non-private is the reference: black and dashed on every plot
    "non_private": dict(color="black", linestyle="--", marker="o", label="non-private"),
    "flash_bk": dict(color="#d62728", marker="s", label="flash_bk"),
    "flash": dict(color="#ff7f0e", marker="^", label="flash"),
    "opacus_ghost": dict(color="#1f77b4", marker="D", label="Opacus ghost"),
    "opacus_hooks": dict(color="#2ca02c", marker="v", label="Opacus hooks"),
}
PARTS = {  # the memory breakdown, bottom to top
    "parameters_mib": ("parameters", "#4c4c4c"),
    "optimizer_state_mib": ("optimizer state", "#9e9e9e"),
    "gradients_mib": ("gradients", "#1f77b4"),
    "activations_mib": ("activations", "#2ca02c"),
    "backward_extra_mib": ("backward extra (clipping)", "#d62728"),
    "optimizer_step_mib": ("optimizer step", "#ff7f0e"),
}
GROUP = ("model", "latent_size", "precision", "trainable", "gradient_checkpointing", "device_name")
PAPER = {"font.size": 8, "axes.titlesize": 8, "legend.fontsize": 7, "figure.dpi": 200, "savefig.bbox": "tight"}


def load(directory: Path) -> tuple[list[dict], list[dict]]:
    """(runs, largest-batch summaries) of results.jsonl; runs without a memory limit only (the grid)."""
    records = [json.loads(line) for line in (directory / "results.jsonl").read_text().splitlines() if line.strip()]
    runs = [r for r in records if r.get("kind", "run") == "run" and r.get("memory_limit_gib") is None]
    return runs, [r for r in records if r.get("kind") == "max_batch"]


def group_of(record: dict) -> tuple:
    return tuple(record.get(k) for k in GROUP)


def title(group: tuple) -> str:
    model, latent, precision, trainable, checkpointing, device = group
    text = f"{model}, {latent * 8} px ({latent}x{latent} latents), {precision}, {trainable}"
    return text + (", checkpointing" if checkpointing else "") + (f"\n{device}" if device else "")


def slug(group: tuple) -> str:
    model, latent, precision, trainable, checkpointing, _ = group
    return f"{model.replace('/', '-')}_latent{latent}_{precision}_{trainable}" + ("_ckpt" if checkpointing else "")


def by_mode(runs: list[dict]) -> dict[str, list[dict]]:
    """Successful runs per mode, sorted by batch (the latest result of a batch wins)."""
    latest: dict[tuple, dict] = {}
    for r in runs:
        if r["status"] == "ok":
            latest[(r["mode"], r["batch_size"])] = r
    modes: dict[str, list[dict]] = defaultdict(list)
    for (mode, _), r in sorted(latest.items(), key=lambda item: item[0][1]):
        modes[mode].append(r)
    return {mode: modes[mode] for mode in MODE_STYLE if mode in modes}


def _line_plot(modes: dict, field: str, ylabel: str, group: tuple, path: Path, scale: float = 1.0) -> Path:
    with plt.rc_context(PAPER):
        fig, ax = plt.subplots(figsize=(3.4, 2.5))
        for mode, rows in modes.items():
            ax.plot([r["batch_size"] for r in rows], [r[field] * scale for r in rows], **MODE_STYLE[mode])
        ax.set_xscale("log", base=2)
        batches = sorted({r["batch_size"] for rows in modes.values() for r in rows})
        ax.set_xticks(batches, [str(b) for b in batches])
        ax.minorticks_off()
        ax.set_xlabel("physical batch size")
        ax.set_ylabel(ylabel)
        ax.set_ylim(bottom=0)
        ax.set_title(title(group))
        ax.grid(alpha=0.3)
        ax.legend(frameon=False)
        fig.savefig(path)
        plt.close(fig)
    return path


def breakdown_batch(modes: dict) -> int | None:
    """The largest batch every mode ran at."""
    common = set.intersection(*({r["batch_size"] for r in rows} for rows in modes.values())) if modes else set()
    return max(common) if common else None


def plot_breakdown(modes: dict, batch: int, group: tuple, path: Path) -> Path:
    rows = {mode: next(r for r in rs if r["batch_size"] == batch) for mode, rs in modes.items()}
    with plt.rc_context(PAPER):
        fig, ax = plt.subplots(figsize=(3.4, 2.7))
        labels = [MODE_STYLE[m]["label"] for m in rows]
        bottom = [0.0] * len(rows)
        for field, (name, color) in PARTS.items():
            values = [r.get(field, 0.0) / 1024 for r in rows.values()]
            ax.bar(labels, values, bottom=bottom, color=color, label=name, width=0.6)
            bottom = [b + v for b, v in zip(bottom, values, strict=True)]
        ax.set_ylabel("GiB at the step's peak")
        ax.set_title(f"{title(group)}\nbatch {batch}")
        ax.legend(frameon=False, loc="upper left", bbox_to_anchor=(1.0, 1.0))
        ax.tick_params(axis="x", labelrotation=20)
        fig.savefig(path)
        plt.close(fig)
    return path


def plot_max_batch(summaries: list[dict], group: tuple, path: Path) -> Path:
    summaries = sorted(summaries, key=lambda s: list(MODE_STYLE).index(s["mode"]))
    with plt.rc_context(PAPER):
        fig, ax = plt.subplots(figsize=(3.4, 2.5))
        labels = [MODE_STYLE[s["mode"]]["label"] for s in summaries]
        bars = ax.bar(
            labels, [s["max_batch"] for s in summaries], color=[MODE_STYLE[s["mode"]]["color"] for s in summaries]
        )
        for bar, s in zip(bars, summaries, strict=True):
            speed = f"\n{s['samples_per_s']:.3g}/s" if s.get("samples_per_s") else ""
            ax.annotate(
                f"{s['max_batch']}{speed}",
                (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                ha="center",
                va="bottom",
                fontsize=7,
            )
        limit = summaries[0].get("memory_limit_gib")
        ax.set_ylabel("largest physical batch" + (f" in {limit:g} GiB" if limit else ""))
        ax.set_title(title(group))
        ax.margins(y=0.25)
        ax.tick_params(axis="x", labelrotation=20)
        fig.savefig(path)
        plt.close(fig)
    return path


def table(modes: dict) -> list[str]:
    """Markdown: samples/s and peak memory per mode and batch, each as a ratio to non-private at the same batch."""
    base = {r["batch_size"]: r for r in modes.get("non_private", [])}
    lines = ["| mode | batch | samples/s | vs non-private | peak MiB | vs non-private |", "|---|---|---|---|---|---|"]
    for mode, rows in modes.items():
        for r in rows:
            b = base.get(r["batch_size"])
            speed = f"{r['samples_per_s'] / b['samples_per_s']:.2f}" if b else ""
            memory = f"{r['peak_mib'] / b['peak_mib']:.2f}" if b else ""
            lines.append(
                f"| {MODE_STYLE[mode]['label']} | {r['batch_size']} | {r['samples_per_s']:.2f} | {speed} "
                f"| {r['peak_mib']:.0f} | {memory} |"
            )
    return lines


def breakdown_table(modes: dict, batch: int) -> list[str]:
    header = " | ".join(name for name, _ in PARTS.values())
    lines = [f"| mode (batch {batch}), MiB | {header} | peak |", "|---" * (len(PARTS) + 2) + "|"]
    for mode, rows in modes.items():
        r = next(r for r in rows if r["batch_size"] == batch)
        parts = " | ".join(f"{r.get(field, 0.0):.1f}" for field in PARTS)
        lines.append(f"| {MODE_STYLE[mode]['label']} | {parts} | {r['peak_mib']:.1f} |")
    return lines


def failures(runs: list[dict]) -> list[str]:
    return [
        f"- {r['mode']} batch {r['batch_size']}: {r['status']} ({r.get('error', '')})"
        for r in runs
        if r["status"] != "ok"
    ]


def draw_all(directory: str | Path) -> list[Path]:
    """Every plot of every group, and tables.md; returns the files written."""
    directory = Path(directory)
    runs, summaries = load(directory)
    groups: dict[tuple, list[dict]] = defaultdict(list)
    for r in runs:
        groups[group_of(r)].append(r)
    searched: dict[tuple, list[dict]] = defaultdict(list)
    for s in summaries:
        searched[group_of(s)].append(s)
    written, text = [], []
    for group in sorted(set(groups) | set(searched), key=str):
        name, modes = slug(group), by_mode(groups.get(group, []))
        text += [f"## {title(group).replace(chr(10), ' on ')}", ""]
        if modes:
            written.append(
                _line_plot(modes, "samples_per_s", "samples/s", group, directory / f"{name}_throughput.png")
            )
            written.append(
                _line_plot(modes, "peak_mib", "peak memory (GiB)", group, directory / f"{name}_memory.png", 1 / 1024)
            )
            text += table(modes) + [""]
            batch = breakdown_batch(modes)
            if batch:
                written.append(plot_breakdown(modes, batch, group, directory / f"{name}_breakdown.png"))
                text += breakdown_table(modes, batch) + [""]
        if group in searched:
            written.append(plot_max_batch(searched[group], group, directory / f"{name}_max_batch.png"))
            text += [
                "| mode | largest batch | memory limit GiB | stopped by | samples/s there |",
                "|---|---|---|---|---|",
            ]
            text += [
                f"| {MODE_STYLE[s['mode']]['label']} | {s['max_batch']} | {s['memory_limit_gib']} | "
                f"{s['stopped_by']} | {s['samples_per_s'] or 0:.2f} |"
                for s in searched[group]
            ] + [""]
        text += failures(groups.get(group, [])) + [""]
    tables = directory / "tables.md"
    tables.write_text("\n".join(text))
    return written + [tables]


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("directory", help="A suite's --output_dir (holding results.jsonl).")
    for path in draw_all(parser.parse_args().directory):
        print(path)
