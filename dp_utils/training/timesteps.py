"""The training timesteps: uniform over the whole schedule, or over the range --timestep_min..--timestep_max."""

from __future__ import annotations

import torch

from ..errors import UserError


def timestep_range(args, num_train_timesteps: int) -> tuple[int, int]:
    """(low, high) inclusive; a --timestep_max beyond the schedule is refused before any compute."""
    high = num_train_timesteps - 1 if args.timestep_max is None else args.timestep_max
    if high >= num_train_timesteps:
        raise UserError(
            f"--timestep_max {high} is beyond the scheduler's {num_train_timesteps} timesteps (0 to "
            f"{num_train_timesteps - 1})."
        )
    return args.timestep_min, high


def sample_timesteps(n: int, low: int, high: int, device: torch.device) -> torch.Tensor:
    """n timesteps uniform on [low, high] (torch's global RNG, as diffusers' scripts draw them)."""
    return torch.randint(low, high + 1, (n,), device=device)
