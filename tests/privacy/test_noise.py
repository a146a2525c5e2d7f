"""GaussianNoise: N(0, std^2) added in place, spread over threads, reproducible, failing loudly; the foreach pass."""

import threading

import pytest
import torch
from opacus.optimizers.optimizer import _generate_noise

from dp_utils.privacy.noise import GaussianNoise, NoiseError, add_noise_foreach_, add_secure_noise_, tensor_chunks


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


def _with_threads(threads, fn):
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        return fn()
    finally:
        torch.set_num_threads(previous)


def test_a_failing_thread_raises_after_every_thread_stopped(monkeypatch):
    original = GaussianNoise._add_share
    finished = []

    def add_share(self, share, std, scale, generator, index):
        if index == 1:
            raise RuntimeError("injected failure")
        original(self, share, std, scale, generator, index)
        finished.append(index)

    monkeypatch.setattr(GaussianNoise, "_add_share", add_share)
    grads = tensors()
    with pytest.raises(NoiseError, match=r"failed in 1 of 2 threads.*injected failure.*must not be taken") as caught:
        _with_threads(2, lambda: GaussianNoise().add_(grads, 1.0, torch.Generator().manual_seed(0)))
    assert isinstance(caught.value.__cause__, RuntimeError)
    assert finished == [0]  # the other thread ran to its end before the error reached the caller


def test_a_failing_draw_in_a_thread_raises(monkeypatch):
    """torch's own normal_ failing inside a worker thread (not the caller's) reaches the caller."""
    original = torch.Tensor.normal_
    main = threading.get_ident()
    calls = []

    def normal_(self, *args, **kwargs):
        if threading.get_ident() != main:
            calls.append(1)
            if len(calls) == 2:
                raise RuntimeError("normal_ failed")
        return original(self, *args, **kwargs)

    monkeypatch.setattr(torch.Tensor, "normal_", normal_)
    with pytest.raises(NoiseError, match="normal_ failed"):
        _with_threads(2, lambda: GaussianNoise().add_(tensors(), 1.0, torch.Generator().manual_seed(0)))
    assert len(calls) >= 2


@pytest.mark.parametrize("std", [float("nan"), float("inf"), -1.0])
def test_an_invalid_std_is_refused_before_any_change(std):
    grads = [torch.ones(10)]
    for add in (GaussianNoise().add_, add_noise_foreach_, add_secure_noise_):
        with pytest.raises(NoiseError, match="std must be finite and >= 0"):
            add(grads, std, None, 0.5)
    assert torch.equal(grads[0], torch.ones(10))


def test_tensor_chunks_group_by_dtype_keep_order_and_bound_the_size():
    a, b, c = torch.zeros(6), torch.zeros(3), torch.zeros(20)  # c alone exceeds the bound
    d, e = torch.zeros(4, dtype=torch.float64), torch.zeros(5)
    chunks = tensor_chunks([a, b, d, c, e], max_numel=10)
    assert [[t.numel() for t in chunk] for chunk in chunks] == [[6, 3], [20], [5], [4]]
    assert chunks[0][0] is a and chunks[3][0] is d


def test_foreach_noise_is_scale_times_grad_plus_std_times_one_draw_per_chunk():
    grads = [torch.full((30, 20), 2.0), torch.full((7,), -1.0), torch.full((400,), 3.0, dtype=torch.float64)]
    originals = [g.clone() for g in grads]
    add_noise_foreach_(grads, 0.5, torch.Generator().manual_seed(1), scale=0.25, chunk_numel=10_000)
    generator = torch.Generator().manual_seed(1)
    z32, z64 = torch.randn(607, generator=generator), torch.randn(400, generator=generator, dtype=torch.float64)
    expected = [0.25 * originals[0] + 0.5 * z32[:600].view(30, 20), 0.25 * originals[1] + 0.5 * z32[600:]]
    expected.append(0.25 * originals[2] + 0.5 * z64)
    for g, e in zip(grads, expected, strict=True):
        torch.testing.assert_close(g, e, rtol=1e-6, atol=1e-6)


def test_foreach_noise_statistics_over_several_chunks():
    grads = [torch.full((20000,), 5.0), torch.full((3000,), -2.0), torch.zeros(50, 50)]
    add_noise_foreach_(grads, 0.1, torch.Generator().manual_seed(0), scale=0.5, chunk_numel=4000)
    assert len(tensor_chunks(grads, 4000)) == 3
    for g, mean in zip(grads, (2.5, -1.0, 0.0), strict=True):
        n = g.numel()
        assert abs(g.mean().item() - mean) < 4 * 0.1 / n**0.5
        assert abs(g.std().item() - 0.1) < 4 * 0.1 / (2 * n) ** 0.5
    assert not torch.equal(grads[0][:4000], grads[0][4000:8000])  # each chunk its own draw


def test_secure_noise_is_opacus_secure_noise():
    grads = [torch.full((50, 4), 1.5, dtype=torch.float64), torch.zeros(9, dtype=torch.float64)]
    originals = [g.clone() for g in grads]
    add_secure_noise_(grads, 0.3, torch.Generator().manual_seed(2), scale=0.5)
    generator = torch.Generator().manual_seed(2)
    for g, o in zip(grads, originals, strict=True):
        expected = 0.5 * o + _generate_noise(0.3, o, generator, secure_mode=True)
        torch.testing.assert_close(g, expected, rtol=0, atol=1e-12)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_noise_is_the_foreach_pass_with_the_asked_std_and_scale():
    def cuda_tensors():
        return [torch.full((3000, 1000), 4.0, device="cuda"), torch.full((77,), 4.0, device="cuda")]

    grads, reference = cuda_tensors(), cuda_tensors()
    GaussianNoise().add_(grads, 0.2, torch.Generator("cuda").manual_seed(5), scale=0.5)
    add_noise_foreach_(reference, 0.2, torch.Generator("cuda").manual_seed(5), scale=0.5)
    assert all(torch.equal(g, r) for g, r in zip(grads, reference, strict=True))
    values = grads[0].double()
    n = values.numel()
    assert abs(values.mean().item() - 2.0) < 4 * 0.2 / n**0.5
    assert abs(values.std().item() - 0.2) < 4 * 0.2 / (2 * n) ** 0.5
    again = cuda_tensors()
    GaussianNoise().add_(again, 0.2, torch.Generator("cuda").manual_seed(5), scale=0.5)
    assert all(torch.equal(g, a) for g, a in zip(grads, again, strict=True))


def test_small_gradients_are_noised_on_the_callers_thread_from_its_generator(monkeypatch):
    started = []
    monkeypatch.setattr(threading.Thread, "start", lambda self: started.append(self))
    grads = [torch.zeros(100), torch.zeros(7)]
    GaussianNoise().add_(grads, 0.5, torch.Generator().manual_seed(4))
    generator = torch.Generator().manual_seed(4)
    expected = [
        torch.empty(100).normal_(0, 0.5, generator=generator),
        torch.empty(7).normal_(0, 0.5, generator=generator),
    ]
    assert started == [] and all(torch.equal(g, e) for g, e in zip(grads, expected, strict=True))
