"""GaussianNoise: N(0, std^2) added in place, spread over threads, reproducible from the caller's generator."""

import pytest
import torch

from dp_utils.noise import GaussianNoise


def tensors():
    return [torch.zeros(300, 200), torch.zeros(5000), torch.zeros(7), torch.zeros(300, 200), torch.zeros(40, 3, 3)]


@pytest.mark.parametrize("threads", [1, 2, 3])
def test_noise_has_the_asked_std_and_no_mean(threads):
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        grads = tensors()
        GaussianNoise().add_(grads, 0.3, torch.Generator().manual_seed(0))
    finally:
        torch.set_num_threads(previous)
    values = torch.cat([g.flatten() for g in grads])
    n = values.numel()
    assert abs(values.std().item() - 0.3) < 4 * 0.3 / (2 * n) ** 0.5
    assert abs(values.mean().item()) < 4 * 0.3 / n**0.5
    assert all(g.std() > 0.2 for g in grads if g.numel() > 100)  # every tensor got noise
    assert not torch.equal(grads[0], grads[3])  # same-shape tensors get independent draws


def test_noise_is_added_to_what_is_there():
    grads = [torch.full((1000,), 5.0)]
    GaussianNoise().add_(grads, 0.01, torch.Generator().manual_seed(0))
    assert abs(grads[0].mean().item() - 5.0) < 0.01


def test_scale_applies_to_the_gradient_not_to_the_noise():
    grads = [torch.full((20000,), 5.0), torch.full((300,), -2.0)]
    GaussianNoise().add_(grads, 0.1, torch.Generator().manual_seed(0), scale=0.25)
    assert abs(grads[0].mean().item() - 1.25) < 4 * 0.1 / 20000**0.5
    assert abs(grads[0].std().item() - 0.1) < 4 * 0.1 / (2 * 20000) ** 0.5
    assert abs(grads[1].mean().item() + 0.5) < 4 * 0.1 / 300**0.5


def test_same_generator_state_same_noise_and_the_generator_advances():
    first, second, third = tensors(), tensors(), tensors()
    noise = GaussianNoise()
    noise.add_(first, 1.0, torch.Generator().manual_seed(3))
    noise.add_(second, 1.0, torch.Generator().manual_seed(3))
    generator = torch.Generator().manual_seed(3)
    noise.add_(third, 1.0, generator)
    noise.add_(third, 1.0, generator)
    assert all(torch.equal(a, b) for a, b in zip(first, second, strict=True))
    assert not all(torch.equal(a, 2 * b) for a, b in zip(first, third, strict=True))


def test_global_rng_drives_noise_without_a_generator():
    torch.manual_seed(11)
    first = tensors()
    GaussianNoise().add_(first, 1.0)
    torch.manual_seed(11)
    second = tensors()
    GaussianNoise().add_(second, 1.0)
    assert all(torch.equal(a, b) for a, b in zip(first, second, strict=True))


def test_zero_std_adds_nothing_and_still_scales():
    grads = tensors()
    GaussianNoise().add_(grads, 0.0)
    assert all(not g.any() for g in grads)
    grads = [torch.arange(10.0)]
    GaussianNoise().add_(grads, 0.0, scale=0.5)
    assert torch.equal(grads[0], torch.arange(10.0) / 2)
