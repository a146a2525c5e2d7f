"""The optimizer the DP optimizer steps after the noise is added: AdamW, DP-AdamBC or SGD with momentum.

DP-AdamBC (Tang et al., AAAI 2024): under DP the gradient Adam sees is g + z, z ~ N(0, (sigma C / B)^2) per
coordinate, so Adam's second moment estimates E[g^2] + (sigma C / B)^2 and, where the noise dominates, divides every
coordinate by about sigma C / B: each update is then about lr in size, mostly noise. DP-AdamBC subtracts that known
variance from the bias-corrected second moment, floored at `gamma`:

    theta -= lr * m_hat / sqrt(max(v_hat - (sigma C / B)^2, gamma))

Where the noise dominates it is SGD with momentum at rate lr / sqrt(gamma); where the signal dominates, Adam. The
subtracted variance is a function of sigma, C and the expected batch size B only: public, no privacy cost.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch

from ..privacy.privacy_engine import PrivacyEngine

OPTIMIZERS = ("adamw", "dp_adambc", "sgd")


class DPAdamBC(torch.optim.Optimizer):
    """Adam with the DP noise's variance (sigma C / B)^2 subtracted from its second moment; decoupled weight decay."""

    def __init__(
        self,
        params: Iterable[torch.nn.Parameter],
        noise_std: float,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        gamma: float = 5e-8,
        weight_decay: float = 0.0,
    ):
        if not noise_std >= 0:
            raise ValueError(f"noise_std (sigma C / B) must be >= 0, got {noise_std}")
        if not gamma > 0:
            raise ValueError(f"gamma (the floor of the corrected second moment) must be > 0, got {gamma}")
        self.noise_variance = float(noise_std) ** 2  # per coordinate, of the gradient the optimizer is given
        super().__init__(params, dict(lr=lr, betas=betas, gamma=gamma, weight_decay=weight_decay))

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if not state:  # the step count is a tensor on the device: the step can be a CUDA graph's
                    state["step"] = torch.zeros((), dtype=torch.promote_types(p.dtype, torch.float32), device=p.device)
                    state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                    state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                state["step"] += 1
                t, m, v = state["step"], state["exp_avg"], state["exp_avg_sq"]
                m.lerp_(p.grad, 1 - beta1)
                v.mul_(beta2).addcmul_(p.grad, p.grad, value=1 - beta2)
                if group["weight_decay"]:
                    p.mul_(1 - group["lr"] * group["weight_decay"])
                v_hat = (v / (1 - beta2**t)).sub_(self.noise_variance).clamp_(min=group["gamma"])
                p.addcdiv_(m / (1 - beta1**t), v_hat.sqrt_(), value=-group["lr"])
        return loss


def dp_noise_std(args, plan) -> float:
    """sigma C / B of the noise in the gradient the inner optimizer gets: public (sigma calibrated from epsilon, delta,
    q and the steps as make_private calibrates it; B the expected batch size that the DP optimizer divides by)."""
    sigma = args.noise_multiplier
    if sigma is None:
        engine = PrivacyEngine(accountant=args.accountant)
        sigma = engine._calibrate(args.target_epsilon, plan.delta, plan.sample_rate, plan.max_train_steps)
    return sigma * args.max_grad_norm / plan.expected_batch_size


def check_noise_std(noise_std: float, dp_optimizer, world_size: int) -> None:
    """Refuse a run whose DP-AdamBC subtracts another variance than the DP optimizer's noise has."""
    batch = dp_optimizer.expected_batch_size * world_size  # Opacus keeps the per-rank share
    actual = dp_optimizer.noise_multiplier * dp_optimizer.max_grad_norm / batch
    if not math.isclose(noise_std, actual, rel_tol=1e-9):
        raise RuntimeError(f"DP-AdamBC subtracts a noise std of {noise_std:.6g}, but the DP noise has {actual:.6g}.")


def build_optimizer(args, params: list[torch.nn.Parameter], noise_std: float) -> torch.optim.Optimizer:
    """The inner optimizer named by --optimizer; noise_std = sigma C / B is public (used by dp_adambc only)."""
    name = args.optimizer
    if name == "adamw":
        betas = (args.adam_beta1, args.adam_beta2)
        return torch.optim.AdamW(params, lr=args.learning_rate, betas=betas, weight_decay=args.adam_weight_decay)
    if name == "dp_adambc":
        betas = (args.adam_beta1, args.adam_beta2)
        return DPAdamBC(params, noise_std, args.learning_rate, betas, args.dp_adambc_gamma, args.adam_weight_decay)
    if name == "sgd":
        return torch.optim.SGD(
            params, lr=args.learning_rate, momentum=args.sgd_momentum, weight_decay=args.adam_weight_decay
        )
    raise ValueError(f"unknown optimizer {name!r}; one of {OPTIMIZERS}")
