"""What a training run does, fixed before its first step: N, q, steps, delta; its start summary and final report."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from opacus.accountants import create_accountant

from ..privacy.privacy_engine import _quiet_accountant


@dataclass(frozen=True)
class RunPlan:
    """The sampling the accountant is told about: N rows, one logical batch per 1/q of them, `steps` steps."""

    num_images: int  # N: the rows actually trained on (after --max_train_samples)
    steps_per_epoch: int
    max_train_steps: int
    delta: float

    @property
    def sample_rate(self) -> float:
        return 1 / self.steps_per_epoch

    @property
    def expected_batch_size(self) -> float:
        return self.num_images * self.sample_rate


def plan_run(
    num_images: int, logical_batch_size: int, max_train_steps: int | None, num_train_epochs: int, delta: float | None
) -> RunPlan:
    """Steps per epoch ceil(N / logical batch), the planned steps, and delta (default 1 / (10 N), well below 1/N)."""
    steps_per_epoch = math.ceil(num_images / logical_batch_size)
    steps = max_train_steps or num_train_epochs * steps_per_epoch
    return RunPlan(num_images, steps_per_epoch, steps, delta if delta is not None else 1 / (10 * num_images))


def planned_epsilon(accountant: str, noise_multiplier: float, plan: RunPlan) -> float:
    """Epsilon after all planned steps (Opacus' accountant); inf without noise."""
    if noise_multiplier == 0:
        return math.inf
    opacus_accountant = create_accountant(mechanism=accountant)
    opacus_accountant.history = [(noise_multiplier, plan.sample_rate, plan.max_train_steps)]
    with _quiet_accountant():
        return opacus_accountant.get_epsilon(delta=plan.delta)


def training_summary(
    plan: RunPlan,
    privacy_parameters: PrivacyParameters,
    accountant: str,
    model: torch.nn.Module,
    physical_batches: str,
    start_step: int,
) -> str:
    """The "***** Running training *****" block diffusers' scripts print, with the DP quantities."""
    sigma = privacy_parameters.noise_multiplier
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    frozen = sum(p.numel() for p in model.parameters()) - trainable
    lines = [
        "***** Running training *****",
        f"  Num examples (N) = {plan.num_images}",
        f"  Sample rate (q) = {plan.sample_rate:.4g} (1 / {plan.steps_per_epoch} steps per epoch)",
        f"  Expected logical batch (N q) = {plan.expected_batch_size:.1f}, physical batches of at most "
        f"{physical_batches}",
        f"  Total optimization steps = {plan.max_train_steps}"
        + (f" (resuming at step {start_step})" if start_step else ""),
        f"  Noise multiplier (sigma) = {sigma:.4g}, clipping norm (C) = {privacy_parameters.max_grad_norm}",
        f"  Delta = {plan.delta:.3g}, expected epsilon after all steps = "
        f"{planned_epsilon(accountant, sigma, plan):.3f} ({accountant} accountant)",
        f"  Trainable parameters = {trainable:,}" + (f" ({frozen:,} frozen)" if frozen else ""),
    ]
    return "\n".join(lines)


@dataclass(frozen=True)
class PrivacyParameters:
    """What the accountant composes, checkpointed with the step: a resumed run must have the same, or the
    accounting would be broken."""

    noise_multiplier: float  # sigma
    sample_rate: float  # q
    dataset_size: int  # N
    max_grad_norm: float  # C
    noise_multiplicity: int  # K rows per image, clipped as one example
    delta: float
    max_train_steps: int

    # what a resume must not change (delta and the planned steps may: the accountant reports for the new ones)
    MUST_MATCH = ("noise_multiplier", "sample_rate", "dataset_size", "max_grad_norm", "noise_multiplicity")


def privacy_parameters(
    plan: RunPlan, noise_multiplier: float, max_grad_norm: float, noise_multiplicity: int
) -> PrivacyParameters:
    """The run's privacy parameters: its plan's sampling and the DP optimizer's sigma, C and K."""
    return PrivacyParameters(
        noise_multiplier=noise_multiplier,
        sample_rate=plan.sample_rate,
        dataset_size=plan.num_images,
        max_grad_norm=max_grad_norm,
        noise_multiplicity=noise_multiplicity,
        delta=plan.delta,
        max_train_steps=plan.max_train_steps,
    )


def privacy_report(
    plan: RunPlan, epsilon: float, steps: int, privacy_parameters: PrivacyParameters, **run: object
) -> dict:
    """privacy_report.json: the guarantee (epsilon None without noise), the sampling, and how the run trained."""
    return dict(
        epsilon=None if math.isinf(epsilon) else epsilon,
        delta=plan.delta,
        weak_delta_accepted=plan.delta >= 1 / plan.num_images,
        noise_multiplier=privacy_parameters.noise_multiplier,
        sample_rate=plan.sample_rate,
        steps=steps,
        dataset_size=plan.num_images,
        expected_batch_size=plan.expected_batch_size,
        max_grad_norm=privacy_parameters.max_grad_norm,
        noise_multiplicity=privacy_parameters.noise_multiplicity,
        **run,
        unit_of_privacy="one training image (one cache row, all its views)",
    )
