"""DP-AdamBC: Adam minus the DP noise's public variance (sigma C / B)^2, and nothing else."""

import argparse
import inspect
import math

import pytest
import torch
from opacus.accountants.utils import get_noise_multiplier

from dp_utils.training.optimizers import DPAdamBC, build_optimizer, check_noise_std, dp_noise_std
from dp_utils.training.plan import plan_run


def reference_steps(grads, lr, betas, noise_variance, gamma, weight_decay=0.0, start=None):
    """Tang et al.'s update in float64, written out: theta -= lr m_hat / sqrt(max(v_hat - Phi, gamma))."""
    theta = start.clone()
    m = torch.zeros_like(theta)
    v = torch.zeros_like(theta)
    for t, g in enumerate(grads, 1):
        m = betas[0] * m + (1 - betas[0]) * g
        v = betas[1] * v + (1 - betas[1]) * g * g
        theta = theta * (1 - lr * weight_decay)
        m_hat, v_hat = m / (1 - betas[0] ** t), v / (1 - betas[1] ** t)
        theta = theta - lr * m_hat / torch.sqrt(torch.clamp(v_hat - noise_variance, min=gamma))
    return theta


@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
def test_update_matches_the_formula(weight_decay):
    g = torch.Generator().manual_seed(0)
    start = torch.randn(50, dtype=torch.float64, generator=g)
    noise_std = 0.3
    grads = [torch.randn(50, dtype=torch.float64, generator=g) * 0.5 for _ in range(6)]
    param = torch.nn.Parameter(start.clone())
    optimizer = DPAdamBC([param], noise_std, lr=1e-2, betas=(0.9, 0.99), gamma=1e-4, weight_decay=weight_decay)
    for grad in grads:
        param.grad = grad.clone()
        optimizer.step()
    expected = reference_steps(grads, 1e-2, (0.9, 0.99), noise_std**2, 1e-4, weight_decay, start)
    torch.testing.assert_close(param.detach(), expected, rtol=1e-12, atol=1e-14)
    v_hat = optimizer.state[param]["exp_avg_sq"] / (1 - 0.99**6)
    assert ((v_hat - noise_std**2) < 1e-4).any() and ((v_hat - noise_std**2) > 1e-4).any()  # floor and correction


def test_without_noise_it_is_adam():
    g = torch.Generator().manual_seed(1)
    a, b = (torch.nn.Parameter(torch.ones(20, dtype=torch.float64)) for _ in range(2))
    bc, adam = DPAdamBC([a], 0.0, lr=1e-2, gamma=1e-300), torch.optim.Adam([b], lr=1e-2, eps=0)
    for _ in range(5):
        grad = torch.randn(20, dtype=torch.float64, generator=g)
        a.grad, b.grad = grad.clone(), grad.clone()
        bc.step()
        adam.step()
    torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)


def flags(**overrides):
    values = dict(
        optimizer="dp_adambc",
        learning_rate=1e-3,
        adam_beta1=0.9,
        adam_beta2=0.999,
        adam_weight_decay=0.0,
        dp_adambc_gamma=5e-8,
        sgd_momentum=0.9,
        noise_multiplier=None,
        target_epsilon=10.0,
        accountant="prv",
        max_grad_norm=1.0,
    )
    values.update(overrides)
    return argparse.Namespace(**values)


def test_noise_variance_is_sigma_c_over_b_from_public_quantities_only():
    """sigma from (epsilon, delta, q, steps) as Opacus calibrates it, C the clipping norm, B = N q: no data."""
    assert list(inspect.signature(dp_noise_std).parameters) == ["args", "plan"]  # flags and the plan: public
    assert "noise_std" in inspect.signature(DPAdamBC).parameters  # the only DP input of the optimizer
    plan = plan_run(4000, 500, 100, 1, None)
    sigma = get_noise_multiplier(
        target_epsilon=10.0, target_delta=plan.delta, sample_rate=plan.sample_rate, steps=100, accountant="prv"
    )
    assert math.isclose(dp_noise_std(flags(max_grad_norm=2.0), plan), sigma * 2.0 / 500, rel_tol=1e-12)
    assert dp_noise_std(flags(noise_multiplier=0.5, target_epsilon=None), plan) == 0.5 / 500
    optimizer = build_optimizer(flags(), [torch.nn.Parameter(torch.zeros(3))], 0.002)
    assert isinstance(optimizer, DPAdamBC) and optimizer.noise_variance == 0.002**2


def test_a_noise_std_unlike_the_dp_optimizers_is_refused():
    class DPOptimizer:  # the attributes Opacus' optimizers have; expected batch per rank
        noise_multiplier, max_grad_norm, expected_batch_size = 0.9, 1.0, 250

    check_noise_std(0.9 / 500, DPOptimizer(), world_size=2)
    with pytest.raises(RuntimeError, match="noise std"):
        check_noise_std(0.9 / 250, DPOptimizer(), world_size=2)


def test_build_optimizer_names():
    params = [torch.nn.Parameter(torch.zeros(3))]
    assert isinstance(build_optimizer(flags(optimizer="adamw"), params, 0.0), torch.optim.AdamW)
    sgd = build_optimizer(flags(optimizer="sgd"), params, 0.0)
    assert isinstance(sgd, torch.optim.SGD) and sgd.param_groups[0]["momentum"] == 0.9
