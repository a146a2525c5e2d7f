"""Two gloo ranks: bucketed all-reduce of the clipped sums, and the noise added once in total across ranks."""

import torch
from test_sampling import run_two_ranks
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import dp_utils
from dp_utils.privacy.noise import tensor_chunks
from dp_utils.privacy.optimizer import all_reduce_in_buckets_

BUCKET = 60  # elements: small enough that the tensors below fill several buckets, one of them a tensor alone


def _tensors(rank: int) -> list[torch.Tensor]:
    """Rank-dependent values: float32 and float64 tensors, one larger than a bucket, one not contiguous."""
    generator = torch.Generator().manual_seed(rank)
    shapes = [(3, 4), (50,), (7, 7), (1,), (200,), (2, 3, 5)]
    tensors = [torch.randn(shape, generator=generator) for shape in shapes]
    tensors += [torch.randn(6, generator=generator, dtype=torch.float64), torch.randn(5, 3, generator=generator).t()]
    return tensors


def _counting_all_reduce(calls: list):
    all_reduce = torch.distributed.all_reduce

    def counted(tensor, *args, **kwargs):
        calls.append(tensor.numel())
        return all_reduce(tensor, *args, **kwargs)

    return counted


def _bucket_worker(rank: int) -> dict:
    tensors = _tensors(rank)
    per_tensor = [t.clone() for t in tensors if t.is_contiguous()]
    for t in per_tensor:  # Opacus' DistributedDPOptimizerFastGradientClipping.reduce_gradients
        torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.SUM)
        t /= 2
    calls: list[int] = []
    original = torch.distributed.all_reduce
    torch.distributed.all_reduce = _counting_all_reduce(calls)
    try:
        all_reduce_in_buckets_(tensors, divisor=2, bucket_numel=BUCKET)
    finally:
        torch.distributed.all_reduce = original
    return {"bucketed": tensors, "per_tensor": per_tensor, "calls": calls}


def test_bucketed_all_reduce_gives_the_per_tensor_sums(tmp_path):
    results = run_two_ranks(_bucket_worker, tmp_path)
    inputs = [_tensors(0), _tensors(1)]
    expected = [(a + b) / 2 for a, b in zip(*inputs, strict=True)]
    buckets = tensor_chunks(inputs[0], BUCKET)
    assert 1 < len(buckets) < len(expected)
    for r in results:
        assert r["calls"] == [sum(t.numel() for t in bucket) for bucket in buckets]  # one collective per bucket
        assert all(torch.equal(t, e) for t, e in zip(r["bucketed"], expected, strict=True))
        contiguous = [t for t, original in zip(r["bucketed"], inputs[0], strict=True) if original.is_contiguous()]
        assert all(torch.equal(t, p) for t, p in zip(contiguous, r["per_tensor"], strict=True))
        assert not r["bucketed"][-1].is_contiguous()  # the tensors were updated in place, layout kept


SIGMA, CLIP, ROWS, BATCH = 2.0, 0.5, 16, 4


def _noise_worker(rank: int) -> dict:
    torch.manual_seed(0)
    model = nn.Linear(100, 50).double()  # 5050 parameters, the same on both ranks
    data = TensorDataset(torch.randn(ROWS, 100, dtype=torch.float64), torch.randn(ROWS, 50, dtype=torch.float64))
    module, optimizer, criterion, loader = dp_utils.make_private(
        module=model,
        optimizer=torch.optim.SGD(model.parameters(), lr=1.0),
        data_loader=DataLoader(data, batch_size=BATCH),
        noise_multiplier=SIGMA,
        max_grad_norm=CLIP,
        poisson_sampling=False,
        distributed=True,
    )
    torch.manual_seed(100 + rank)  # the ranks' RNGs differ: noise drawn on both would not cancel or coincide
    changes = []
    calls: list[int] = []
    original = torch.distributed.all_reduce
    for _ in range(3):
        x, y = next(iter(loader))
        before = torch.cat([p.detach().flatten().clone() for p in model.parameters()])
        criterion(module(x) * 0, torch.zeros_like(y)).backward()  # zero gradient: the update is the noise alone
        torch.distributed.all_reduce = _counting_all_reduce(calls)
        try:
            optimizer.step()
        finally:
            torch.distributed.all_reduce = original
        optimizer.zero_grad()
        changes.append(before - torch.cat([p.detach().flatten() for p in model.parameters()]))
    return {
        "changes": torch.stack(changes),
        "calls": calls,
        "history": optimizer.privacy_engine.accountant.history,
        "expected_batch_size": optimizer.expected_batch_size,
    }


def test_noise_is_added_once_in_total_across_ranks(tmp_path):
    results = run_two_ranks(_noise_worker, tmp_path)
    assert [r["expected_batch_size"] for r in results] == [BATCH / 2, BATCH / 2]  # per rank, as Opacus counts
    assert torch.equal(results[0]["changes"], results[1]["changes"])  # both ranks apply the same reduced update
    assert [r["calls"] for r in results] == [[5050] * 3] * 2  # weight and bias in one all-reduce per step
    assert [r["history"] for r in results] == [[(SIGMA, BATCH / ROWS, 3)]] * 2
    change = results[0]["changes"].flatten()
    expected, n = SIGMA * CLIP / BATCH, change.numel()  # rank 0's noise alone; both ranks' would be sqrt(2) larger
    assert abs(change.std().item() - expected) < 4 * expected / (2 * n) ** 0.5
    assert abs(change.mean().item()) < 4 * expected / n**0.5


PHYSICAL_BATCH = 2  # rows per backward: each rank's share of a logical batch of 8 is 4 rows, in two of them


def _split_noise_worker(rank: int) -> dict:
    """Three steps of pure noise (zero gradients) in physical batches, noise from make_private's default secret."""
    torch.manual_seed(0)
    model = nn.Linear(100, 50).double()
    data = TensorDataset(torch.randn(ROWS, 100, dtype=torch.float64), torch.randn(ROWS, 50, dtype=torch.float64))
    module, optimizer, criterion, loader = dp_utils.make_private(
        module=model,
        optimizer=torch.optim.SGD(model.parameters(), lr=1.0),
        data_loader=DataLoader(data, batch_size=2 * BATCH),
        noise_multiplier=SIGMA,
        max_grad_norm=CLIP,
        poisson_sampling=False,
        distributed=True,
    )
    changes = []
    for _ in range(3):
        x, y = next(iter(loader))
        before = torch.cat([p.detach().flatten().clone() for p in model.parameters()])
        for start in range(0, len(x), PHYSICAL_BATCH):
            rows = slice(start, start + PHYSICAL_BATCH)
            criterion(module(x[rows]) * 0, torch.zeros_like(y[rows])).backward()
        optimizer.step()
        optimizer.zero_grad()
        changes.append(before - torch.cat([p.detach().flatten() for p in model.parameters()]))
    return {"changes": torch.stack(changes), "history": optimizer.privacy_engine.accountant.history}


def test_secret_noise_is_added_once_per_logical_batch_across_ranks_and_physical_batches(tmp_path):
    results = run_two_ranks(_split_noise_worker, tmp_path)
    assert torch.equal(results[0]["changes"], results[1]["changes"])
    assert [r["history"] for r in results] == [[(SIGMA, 2 * BATCH / ROWS, 3)]] * 2  # 3 steps, not 6 physical batches
    change = results[0]["changes"].flatten()
    expected, n = SIGMA * CLIP / (2 * BATCH), change.numel()  # the global expected batch of 8
    # once in total: not sqrt(2) larger (both ranks), not sqrt(2) larger again (both physical batches), not zero
    assert abs(change.std().item() - expected) < 4 * expected / (2 * n) ** 0.5
    assert abs(change.mean().item()) < 4 * expected / n**0.5
