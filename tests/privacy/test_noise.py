"""NoiseAhead: N(0, std^2) added in place, drawn ahead on a thread, reproducible, failing loudly; the foreach pass."""

import threading

import pytest
import torch
from opacus.optimizers.optimizer import _generate_noise

from dp_utils.privacy import noise as noise_module
from dp_utils.privacy.noise import NoiseAhead, NoiseError, add_noise_foreach_, add_secure_noise_, tensor_chunks


def tensors():
    return [torch.zeros(300, 200), torch.zeros(5000), torch.zeros(7), torch.zeros(70_000)]


def test_noise_has_the_asked_std_and_no_mean_in_every_step():
    noise, generator = NoiseAhead(), torch.Generator().manual_seed(0)
    steps = []
    for _ in range(3):  # the first step draws at once, the next ones were drawn on the thread meanwhile
        grads = tensors()
        noise.add_(grads, 0.3, generator)
        steps.append(torch.cat([g.flatten() for g in grads]))
        n = steps[-1].numel()
        assert abs(steps[-1].std().item() - 0.3) < 4 * 0.3 / (2 * n) ** 0.5
        assert abs(steps[-1].mean().item()) < 4 * 0.3 / n**0.5
        assert all(g.std() > 0.2 for g in grads if g.numel() > 100)  # every tensor got noise
    assert not torch.equal(steps[0], steps[1]) and not torch.equal(steps[1], steps[2])  # fresh noise every step
    block = noise_module.DRAW_BLOCK_NUMEL
    assert not torch.equal(steps[0][:block], steps[0][block : 2 * block])  # blocks of one draw are not repeated


def test_noise_is_added_to_what_is_there_and_scale_applies_to_the_gradient_only():
    grads = [torch.full((20000,), 5.0), torch.full((300,), -2.0)]
    NoiseAhead().add_(grads, 0.1, torch.Generator().manual_seed(0), scale=0.25)
    assert abs(grads[0].mean().item() - 1.25) < 4 * 0.1 / 20000**0.5
    assert abs(grads[0].std().item() - 0.1) < 4 * 0.1 / (2 * 20000) ** 0.5
    assert abs(grads[1].mean().item() + 0.5) < 4 * 0.1 / 300**0.5


def test_same_generator_state_same_noise_and_the_draws_never_touch_it_off_the_callers_thread():
    runs = []
    for _ in range(2):
        noise, generator = NoiseAhead(), torch.Generator().manual_seed(3)
        first, second = tensors(), tensors()
        noise.add_(first, 1.0, generator)
        state = generator.get_state()  # read while the next draw runs on the thread: it uses its own generator
        noise.add_(second, 1.0, generator)
        runs.append((first, second, state))
    (a1, a2, state_a), (b1, b2, state_b) = runs
    assert all(torch.equal(x, y) for x, y in zip(a1 + a2, b1 + b2, strict=True))
    assert torch.equal(state_a, state_b)
    assert not torch.equal(a1[0], a2[0])


def test_a_draw_failing_on_the_thread_raises_at_the_next_step_before_any_change(monkeypatch):
    noise, generator = NoiseAhead(), torch.Generator().manual_seed(0)
    noise.add_(tensors(), 1.0, generator)
    noise._wait()  # the next step's draw ended; fail the one after it
    original = torch.Tensor.normal_
    main = threading.get_ident()

    def normal_(self, *args, **kwargs):
        if threading.get_ident() != main:
            raise RuntimeError("normal_ failed")
        return original(self, *args, **kwargs)

    monkeypatch.setattr(torch.Tensor, "normal_", normal_)
    grads = tensors()
    noise.add_(grads, 1.0, generator)  # uses the draw made before; starts the failing one
    noise._thread.join()
    monkeypatch.undo()
    again = [torch.ones(300, 200), torch.ones(5000), torch.ones(7), torch.ones(70_000)]
    with pytest.raises(NoiseError, match="normal_ failed.*must not be taken"):
        noise.add_(again, 1.0, generator)
    assert all(torch.equal(g, torch.ones_like(g)) for g in again)


@pytest.mark.parametrize("std", [float("nan"), float("inf"), -1.0])
def test_an_invalid_std_is_refused_before_any_change(std):
    grads = [torch.ones(10)]
    for add in (NoiseAhead().add_, add_noise_foreach_, add_secure_noise_):
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


def test_discarding_the_draw_in_flight_rewinds_the_generator_to_before_it():
    """A checkpoint taken after discard() resumes with exactly the noise an uninterrupted run adds next."""
    generator = torch.Generator().manual_seed(5)
    uninterrupted = NoiseAhead()
    uninterrupted.add_(tensors(), 1.0, generator)
    interrupted, checkpoint = NoiseAhead(), torch.Generator().manual_seed(5)
    interrupted.add_(tensors(), 1.0, checkpoint)  # the same first step, on a generator we checkpoint
    interrupted.discard(checkpoint)
    second = tensors()
    uninterrupted.add_(second, 1.0, generator)
    resumed = tensors()
    NoiseAhead().add_(resumed, 1.0, checkpoint)  # a new process, from the saved state
    assert all(torch.equal(a, b) for a, b in zip(second, resumed, strict=True))
