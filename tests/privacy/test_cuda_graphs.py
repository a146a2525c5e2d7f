"""CUDA graphs: refused clearly where they cannot run; on a GPU (skipped without one), replays equal the eager
steps, and every replay of the noisy step draws fresh secret noise of std sigma C / B."""

import pytest
import torch
from oracle import dit_batch, tiny_dit

import dp_utils
from dp_utils.errors import UserError

ROWS = 4
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def private(model, noise_multiplier: float, cuda_graphs: bool, lr: float = 1e-3, **kwargs):
    return dp_utils.make_private(
        module=model,
        optimizer=torch.optim.AdamW(model.parameters(), lr=lr, fused=model.device.type == "cuda"),
        sample_rate=0.5,
        dataset_size=2 * ROWS,  # expected batch B = 4
        noise_multiplier=noise_multiplier,
        max_grad_norm=1.0,
        cuda_graphs=cuda_graphs,
        **kwargs,
    )


def test_cuda_graphs_are_refused_without_cuda_or_with_opacus(tmp_path):
    if not torch.cuda.is_available():
        with pytest.raises(UserError, match="cuda_graphs needs a CUDA device"):
            private(tiny_dit(tmp_path), 1.0, cuda_graphs=True)
    with pytest.raises(UserError, match="cuda_graphs needs grad_sample_mode flash_bk or flash|needs a CUDA device"):
        private(tiny_dit(tmp_path), 1.0, cuda_graphs=True, grad_sample_mode="opacus_hooks")


def train(tmp_path, graphs: bool, steps: int = 7) -> dict:
    torch.manual_seed(0)
    model = tiny_dit(tmp_path).cuda()
    model, optimizer, criterion, _ = private(model, 0.0, graphs)
    x, t, y, noise = (b.cuda() for b in dit_batch(ROWS))
    mask = torch.tensor([True, True, True, False], device="cuda")

    def physical_step():
        with torch.autocast("cuda", enabled=False):
            return criterion(model(x, timestep=t, class_labels=y).sample[:, :4], noise, mask=mask)

    graphed = dp_utils.CudaGraphedStep(physical_step) if graphs else None
    for _ in range(steps):
        if graphed:
            graphed()
        else:
            physical_step().backward()
        optimizer.step()
        optimizer.zero_grad()
    torch.cuda.synchronize()
    assert (graphed is None) or graphed.graph is not None  # captured after the warm-up
    return {n: p.detach().clone() for n, p in model.named_parameters()}


@cuda
def test_graphed_training_equals_eager_training(tmp_path):
    eager, graphed = train(tmp_path, graphs=False), train(tmp_path, graphs=True)
    for name in eager:
        torch.testing.assert_close(graphed[name], eager[name], rtol=1e-5, atol=1e-6, msg=name)


@cuda
def test_every_replay_draws_fresh_noise_of_std_sigma_c_over_b(tmp_path):
    model = tiny_dit(tmp_path).cuda()
    model, optimizer, criterion, _ = private(model, 2.0, True, lr=0.0)
    x, t, y, noise = (b.cuda() for b in dit_batch(ROWS))
    padding = torch.zeros(ROWS, dtype=torch.bool, device="cuda")  # all rows padding: the sums are exactly zero
    draws = []
    for _ in range(8):
        criterion(model(x, timestep=t, class_labels=y).sample[:, :4], noise, mask=padding).backward()
        optimizer.step()
        draws.append(torch.cat([p.grad.flatten() for p in model.parameters()]).clone())
        optimizer.zero_grad()
    assert optimizer.graphed_step.graph is not None  # the last steps were replays
    replays = draws[-4:]
    assert all(not torch.equal(a, b) for a, b in zip(replays, replays[1:], strict=False))
    values = torch.cat(replays).double()
    std, n = 2.0 * 1.0 / ROWS, values.numel()
    assert abs(values.std().item() - std) < 4 * std / (2 * n) ** 0.5
    assert abs(values.mean().item()) < 4 * std / n**0.5
