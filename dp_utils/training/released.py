"""What a run releases besides the model: by default only what the guarantee covers or what is public.

Epsilon, the step, the learning rate and the public hyper-parameters are logged. The training loss and the Poisson
batch size are functions of the private data outside the accounting: logged only with --log_private_metrics.
No seed leaves the run (the noise seed would let anyone subtract the noise).
"""

from __future__ import annotations

import argparse

import torch
from accelerate import Accelerator

SECRET_FLAGS = ("seed", "noise_seed", "hub_token")


def public_config(args: argparse.Namespace) -> dict:
    """The flags a tracker may record: every scalar flag except the seeds (and the Hub token)."""
    return {
        key: value
        for key, value in vars(args).items()
        if key not in SECRET_FLAGS and (value is None or isinstance(value, int | float | str | bool))
    }


def private_metrics(accelerator: Accelerator, loss_sum: float, rows: int, local_batch: int) -> dict:
    """The step's mean training loss and its Poisson batch size, summed over every process (a collective)."""
    totals = torch.tensor([loss_sum, rows, local_batch], dtype=torch.float64, device=accelerator.device)
    loss_sum, rows, batch = accelerator.reduce(totals, reduction="sum").tolist()
    return {"loss": loss_sum / max(rows, 1), "batch": int(batch)}


def noise_source(reproducible: bool) -> str:
    """The privacy report's statement of where the noise and the batches came from."""
    if reproducible:
        return (
            "reproducible from --noise_seed: the guarantee holds only while that seed stays as secret as the "
            "training images"
        )
    return "secret: 128 bits of the operating system's entropy, held only by the checkpoints"


def guarantee_notes(report: dict) -> list[str]:
    """What the model card says about the guarantee's limits: seed, released statistics, N, checkpoints."""
    notes = [
        "The number of training images N is treated as public metadata, as are the hyper-parameters; the guarantee "
        "hides whether any one image was used, not how many there were.",
        "Checkpoints (`checkpoint-*`) hold the noise generator's state and the sampling seed: they are as secret as "
        "the training images and are not covered by the guarantee: publish the model, this card and the privacy "
        "report, never the checkpoint folders.",
    ]
    if report["noise_seed_given"]:
        notes.insert(
            0,
            "**Reproducible noise**: trained with `--noise_seed`. The guarantee holds only while that seed stays "
            "as secret as the training images (it is written nowhere in this folder).",
        )
    if report["private_metrics_logged"]:
        notes.append(
            "The per-step training loss and batch size were logged (`--log_private_metrics`): those logs are "
            "functions of the training images outside the guarantee."
        )
    return notes
