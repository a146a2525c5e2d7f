"""Accelerate on machines without GPUs: several CPU processes (gloo) are real processes too."""

from __future__ import annotations

import os

import torch
from accelerate.utils import parse_flag_from_env


def run_on_cpu() -> bool:
    """Whether accelerate must be told cpu=True: `--cpu`, or several processes started on a machine without GPUs.

    `accelerate launch --cpu` starts a single process, so CPU processes come from `--multi_gpu` (torchrun) on a
    machine without GPUs, where a default Accelerator/PartialState would leave each one thinking it is alone.
    """
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    has_accelerator = torch.accelerator.is_available() if hasattr(torch, "accelerator") else torch.cuda.is_available()
    return parse_flag_from_env("ACCELERATE_USE_CPU") or (world_size > 1 and not has_accelerator)


def check_world_size(num_processes: int) -> None:
    """Refuse to run as one process what the launcher started as several (each would train alone)."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if num_processes != world_size:
        raise RuntimeError(f"Started as {world_size} processes but accelerate set up {num_processes}.")
