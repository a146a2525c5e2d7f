"""NoiseAhead: N(0, std^2) added in place, drawn ahead on a thread, reproducible, failing loudly; the foreach pass."""

import pytest
import torch
from opacus.optimizers.optimizer import _generate_noise

from dp_utils.privacy import noise as noise_module
from dp_utils.privacy.noise import NoiseAhead, NoiseError, add_noise_foreach_, add_secure_noise_, tensor_chunks


def tensors():
    return [torch.zeros(300, 200), torch.zeros(5000), torch.zeros(7), torch.zeros(70_000)]


def test_noise_drawn_into_the_buffers_has_the_asked_std_and_is_fresh_every_step(monkeypatch):
    block = 4096  # several blocks per tensor, whatever the default block size
    monkeypatch.setattr(noise_module, "DRAW_BLOCK_NUMEL", block)
    noise, generator, steps = NoiseAhead(), torch.Generator().manual_seed(0), []
    buffers = tensors()
    for _ in range(3):
        noise.start(buffers, 0.3, generator)
        noise.wait()
        steps.append(torch.cat([b.flatten() for b in buffers]).clone())
        n = steps[-1].numel()
        assert abs(steps[-1].std().item() - 0.3) < 4 * 0.3 / (2 * n) ** 0.5
        assert abs(steps[-1].mean().item()) < 4 * 0.3 / n**0.5
        assert all(b.std() > 0.2 for b in buffers if b.numel() > 100)  # every tensor got noise
    assert not torch.equal(steps[0], steps[1]) and not torch.equal(steps[1], steps[2])
    assert not torch.equal(steps[0][:block], steps[0][block : 2 * block])  # blocks of one draw are not repeated


def test_same_generator_state_same_noise_and_the_worker_never_touches_the_generator():
    runs = []
    for _ in range(2):
        noise, generator, buffers = NoiseAhead(), torch.Generator().manual_seed(3), tensors()
        noise.start(buffers, 1.0, generator)
        state = generator.get_state()  # read while the draw runs on the worker: it uses its own generator
        noise.wait()
        runs.append((buffers, state))
    assert all(torch.equal(a, b) for a, b in zip(runs[0][0], runs[1][0], strict=True))
    assert torch.equal(runs[0][1], runs[1][1])


def test_a_draw_failing_on_the_worker_raises_at_wait(monkeypatch):
    def failing(draws, entropy, std):
        raise RuntimeError("normal_ failed")

    monkeypatch.setattr(noise_module, "_draw_into", failing)
    noise = NoiseAhead()
    noise.start(tensors(), 1.0, torch.Generator().manual_seed(0))
    with pytest.raises(NoiseError, match="normal_ failed.*must not be taken"):
        noise.wait()
    assert not noise.drawn


@pytest.mark.parametrize("std", [float("nan"), float("inf"), -1.0])
def test_an_invalid_std_is_refused_before_any_change(std):
    grads = [torch.ones(10)]
    with pytest.raises(NoiseError, match="std must be finite and >= 0"):
        NoiseAhead().start(grads, std, None)
    for add in (add_noise_foreach_, add_secure_noise_):
        with pytest.raises(NoiseError, match="std must be finite and >= 0"):
            add(grads, std, None)
    assert torch.equal(grads[0], torch.ones(10))


def test_tensor_chunks_group_by_dtype_keep_order_and_bound_the_size():
    a, b, c = torch.zeros(6), torch.zeros(3), torch.zeros(20)  # c alone exceeds the bound
    d, e = torch.zeros(4, dtype=torch.float64), torch.zeros(5)
    chunks = tensor_chunks([a, b, d, c, e], max_numel=10)
    assert [[t.numel() for t in chunk] for chunk in chunks] == [[6, 3], [20], [5], [4]]
    assert chunks[0][0] is a and chunks[3][0] is d


def test_foreach_noise_is_grad_plus_std_times_one_draw_per_chunk():
    grads = [torch.full((30, 20), 2.0), torch.full((7,), -1.0), torch.full((400,), 3.0, dtype=torch.float64)]
    originals = [g.clone() for g in grads]
    add_noise_foreach_(grads, 0.5, torch.Generator().manual_seed(1), chunk_numel=10_000)
    generator = torch.Generator().manual_seed(1)
    z32, z64 = torch.randn(607, generator=generator), torch.randn(400, generator=generator, dtype=torch.float64)
    expected = [originals[0] + 0.5 * z32[:600].view(30, 20), originals[1] + 0.5 * z32[600:], originals[2] + 0.5 * z64]
    for g, e in zip(grads, expected, strict=True):
        torch.testing.assert_close(g, e, rtol=1e-6, atol=1e-6)


def test_foreach_noise_statistics_over_several_chunks():
    grads = [torch.full((20000,), 5.0), torch.full((3000,), -2.0), torch.zeros(50, 50)]
    add_noise_foreach_(grads, 0.1, torch.Generator().manual_seed(0), chunk_numel=4000)
    assert len(tensor_chunks(grads, 4000)) == 3
    for g, mean in zip(grads, (5.0, -2.0, 0.0), strict=True):
        n = g.numel()
        assert abs(g.mean().item() - mean) < 4 * 0.1 / n**0.5
        assert abs(g.std().item() - 0.1) < 4 * 0.1 / (2 * n) ** 0.5
    assert not torch.equal(grads[0][:4000], grads[0][4000:8000])  # each chunk its own draw


def test_secure_noise_is_opacus_secure_noise():
    grads = [torch.full((50, 4), 1.5, dtype=torch.float64), torch.zeros(9, dtype=torch.float64)]
    originals = [g.clone() for g in grads]
    add_secure_noise_(grads, 0.3, torch.Generator().manual_seed(2))
    generator = torch.Generator().manual_seed(2)
    for g, o in zip(grads, originals, strict=True):
        expected = o + _generate_noise(0.3, o, generator, secure_mode=True)
        torch.testing.assert_close(g, expected, rtol=0, atol=1e-12)


def test_discarding_the_drawn_noise_rewinds_the_generator_to_before_it():
    """A checkpoint taken after discard() resumes with exactly the noise an uninterrupted run draws next."""
    generator, noise, first = torch.Generator().manual_seed(5), NoiseAhead(), tensors()
    noise.start(first, 1.0, generator)
    noise.wait()
    noise.discard(generator)
    resumed, again = NoiseAhead(), tensors()
    resumed.start(again, 1.0, generator)  # a new process, from the saved state
    resumed.wait()
    assert all(torch.equal(a, b) for a, b in zip(first, again, strict=True))
