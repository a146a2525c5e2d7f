"""Lock-step Poisson sampling: batch-size law, empty steps, ranks vs one process, resume, empty collation, 2 ranks."""

import pickle
import time
from datetime import timedelta
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import free_port
from torch import nn
from torch.utils.data import DataLoader, TensorDataset
from torch.utils.data._utils.collate import default_collate

import dp_utils
from dp_utils import PoissonBatchSampler, poisson_data_loader
from dp_utils.errors import UserError
from dp_utils.privacy.sampling import EmptyBatchCollate

TIMEOUT_S = 120  # a hang in a collective fails the test instead of blocking the suite


def test_batch_sizes_are_binomial():
    rows, q, steps = 1000, 0.05, 400
    sizes = torch.tensor([len(batch) for batch in PoissonBatchSampler(rows, q, steps, seed=0)], dtype=torch.float64)
    mean, var = rows * q, rows * q * (1 - q)
    assert abs(sizes.mean().item() - mean) < 4 * (var / steps) ** 0.5
    assert abs(sizes.var().item() - var) < 4 * var * (2 / (steps - 1)) ** 0.5  # a fixed batch size has variance 0


def test_every_rank_yields_every_step_even_empty():
    for rank in range(2):
        sampler = PoissonBatchSampler(20, 0.01, steps=50, seed=1, rank=rank, world_size=2)
        assert len(sampler) == 50
        batches = list(sampler)
        assert len(batches) == 50
        assert [] in batches


@pytest.mark.parametrize("world_size", [2, 3])
def test_ranks_split_the_one_process_draw(world_size):
    rows, q, steps = 101, 0.3, 5
    single = list(PoissonBatchSampler(rows, q, steps, seed=2))
    per_rank = [list(PoissonBatchSampler(rows, q, steps, 2, rank, world_size)) for rank in range(world_size)]
    for step, batch in enumerate(single):
        parts = [batches[step] for batches in per_rank]
        assert all(i % world_size == rank for rank, part in enumerate(parts) for i in part)  # the rank's shard
        assert sorted(sum(parts, [])) == batch
    assert list(PoissonBatchSampler(rows, q, steps, seed=3)) != single


def test_resume_at_step_k_equals_the_tail_of_a_full_run():
    full = list(PoissonBatchSampler(50, 0.2, steps=10, seed=4))
    resumed = PoissonBatchSampler(50, 0.2, steps=10, seed=4, start_step=4)
    assert len(resumed) == 6
    assert list(resumed) == full[4:]


def test_epochs_draw_fresh_batches_and_resume_across_epochs():
    sampler = PoissonBatchSampler(50, 0.2, steps=10, seed=4)
    first, second = list(sampler), list(sampler)
    assert all(a != b for a, b in zip(first, second, strict=True))
    resumed = PoissonBatchSampler(50, 0.2, steps=10, seed=4)
    resumed.set_step(13)
    assert len(resumed) == 7
    assert list(resumed) == second[3:]
    cut = PoissonBatchSampler(50, 0.2, steps=10, seed=4)
    next(iter(cut))  # a pass cut short after one step: its remaining steps are never drawn
    assert list(cut) == second


def test_worker_processes_see_the_same_batches():
    data = TensorDataset(torch.arange(30))
    epochs = {}
    for workers in (0, 2):  # the worker iterator calls iter(batch_sampler) twice when it starts
        loader = poisson_data_loader(DataLoader(data, batch_size=5, num_workers=workers), seed=0)
        epochs[workers] = [[x.tolist() for (x,) in loader] for _ in range(2)]
    assert epochs[2] == epochs[0]
    assert epochs[0][0] != epochs[0][1]


def test_poisson_data_loader_batches_and_empty_collation():
    x, y = torch.randn(30, 3, 2), torch.arange(30)
    loader = poisson_data_loader(DataLoader(TensorDataset(x, y), batch_size=1), seed=0, steps=200)
    assert loader.batch_sampler.sample_rate == 1 / 30  # Opacus' rate: 1 / len(data_loader)
    assert len(loader) == 200
    empty = 0
    for (batch_x, batch_y), indices in zip(loader, PoissonBatchSampler(30, 1 / 30, 200, seed=0), strict=True):
        assert torch.equal(batch_x, x[indices]) and torch.equal(batch_y, y[indices])  # (0, 3, 2) and (0,) if empty
        assert batch_x.dtype == x.dtype and batch_y.dtype == y.dtype
        empty += len(batch_y) == 0
    assert empty > 0


def test_empty_batch_keeps_the_structure_of_a_sample():
    sample = {"latent": torch.ones(4, 2, 2, dtype=torch.bfloat16), "label": 7, "pair": (torch.zeros(3), 1.5)}
    collate = pickle.loads(pickle.dumps(EmptyBatchCollate(default_collate, sample)))  # workers may get a copy
    empty = collate([])
    assert empty["latent"].shape == (0, 4, 2, 2) and empty["latent"].dtype == torch.bfloat16
    assert empty["label"].shape == (0,) and empty["label"].dtype == torch.int64
    assert isinstance(empty["pair"], list) and [t.shape for t in empty["pair"]] == [(0, 3), (0,)]
    assert collate([sample, sample])["latent"].shape == (2, 4, 2, 2)
    with pytest.raises(TypeError, match="No empty form for a batch holding str"):
        EmptyBatchCollate(default_collate, (torch.zeros(2), "name"))


class _NoisyRows(torch.utils.data.Dataset):
    """Rows drawn afresh from torch's RNG at every access, as the latent cache does."""

    def __len__(self) -> int:
        return 8

    def __getitem__(self, index: int) -> torch.Tensor:
        return torch.randn(2)


def test_building_the_loader_leaves_torch_rng_alone():
    state = torch.get_rng_state()
    loader = poisson_data_loader(DataLoader(_NoisyRows(), batch_size=2), seed=0)  # reads one row for its shape
    assert torch.equal(torch.get_rng_state(), state)
    assert loader.collate_fn([]).shape == (0, 2)


def test_bad_arguments():
    with pytest.raises(UserError, match="sample_rate must be in"):
        PoissonBatchSampler(10, 0.0, steps=5, seed=0)
    with pytest.raises(UserError, match="sample_rate must be in"):
        PoissonBatchSampler(10, float("nan"), steps=5, seed=0)
    with pytest.raises(UserError, match="num_samples must be positive"):
        PoissonBatchSampler(0, 0.5, steps=5, seed=0)
    with pytest.raises(UserError, match="steps .* must be positive"):
        PoissonBatchSampler(10, 0.5, steps=0, seed=0)
    with pytest.raises(UserError, match="rank must be in"):
        PoissonBatchSampler(10, 0.1, steps=5, seed=0, rank=2, world_size=2)
    with pytest.raises(UserError, match="step must be non-negative"):
        PoissonBatchSampler(10, 0.1, steps=5, seed=0, start_step=-1)
    with pytest.raises(UserError, match="map-style dataset"):
        poisson_data_loader(DataLoader(_Stream()), seed=0)


class _Stream(torch.utils.data.IterableDataset):
    def __iter__(self):
        return iter(range(3))


# Two processes (gloo on 127.0.0.1): the workers are module functions so that spawned processes can import them.


def _init_and_run(rank: int, worker, init_method: str, out_dir: Path, *args) -> None:
    """One rank: join the group, run `worker(rank, *args)`, save what it returns for the parent."""
    torch.distributed.init_process_group(
        "gloo", init_method=init_method, rank=rank, world_size=2, timeout=timedelta(seconds=TIMEOUT_S / 2)
    )
    try:
        torch.save(worker(rank, *args), out_dir / f"rank{rank}.pt")
    finally:
        torch.distributed.destroy_process_group()


def run_two_ranks(worker, out_dir: Path, *args) -> list:
    """`worker(rank, *args)` on 2 spawned ranks; their results, or a failure if they do not finish in time."""
    port = free_port()
    context = torch.multiprocessing.start_processes(
        _init_and_run,
        args=(worker, f"tcp://127.0.0.1:{port}", out_dir, *args),
        nprocs=2,
        join=False,
        start_method="spawn",
    )
    deadline = time.monotonic() + TIMEOUT_S
    while not context.join(timeout=1):
        if time.monotonic() > deadline:
            for process in context.processes:
                process.kill()
            pytest.fail(f"the 2 ranks did not finish in {TIMEOUT_S} s: a rank is stuck in a collective")
    return [torch.load(out_dir / f"rank{rank}.pt") for rank in range(2)]


def _lock_step_worker(rank: int, rows: int, seed: int) -> dict:
    data = TensorDataset(torch.arange(rows), torch.randn(rows, 2))
    loader = poisson_data_loader(DataLoader(data, batch_size=1), seed=seed, distributed=True)
    batches, totals, feature_shapes = [], [], []
    for indices, features in loader:
        total = torch.tensor([len(indices)])
        torch.distributed.all_reduce(total)  # what DDP or the DP optimizer does once per step
        batches.append(indices.tolist())
        totals.append(total.item())
        feature_shapes.append(tuple(features.shape))
    return {"batches": batches, "totals": totals, "feature_shapes": feature_shapes}


def test_two_ranks_stay_in_lock_step_through_empty_batches(tmp_path):
    rows, seed = 40, 5  # q = 1/40: a rank's 20 rows are all left out at about 60% of steps
    results = run_two_ranks(_lock_step_worker, tmp_path, rows, seed)
    assert [len(r["batches"]) for r in results] == [rows, rows]
    assert results[0]["totals"] == results[1]["totals"]
    one_process = PoissonBatchSampler(rows, 1 / rows, rows, seed)
    uneven = 0
    for step in range(rows):
        local = [r["batches"][step] for r in results]
        assert sorted(local[0] + local[1]) == one_process.indices_at(step)
        assert results[0]["totals"][step] == len(local[0]) + len(local[1])
        uneven += (len(local[0]) == 0) != (len(local[1]) == 0)  # the case where Opacus' sampler hangs
        for r, indices in zip(results, local, strict=True):
            assert r["feature_shapes"][step] == (len(indices), 2)
    assert uneven > 0


def _linear_problem() -> tuple[nn.Module, DataLoader]:
    """A tiny regression, the same on every rank: 12 rows, batch size 2, so q = 1/6 and 6 steps per epoch."""
    torch.manual_seed(0)
    model = nn.Linear(4, 2).double()
    data = TensorDataset(torch.randn(12, 4, dtype=torch.float64), torch.randn(12, 2, dtype=torch.float64))
    return model, DataLoader(data, batch_size=2)


def _train(model, loader, **make_private_kwargs) -> dict:
    """Noise-free DP-SGD, 2 epochs in physical batches of at most 2 rows; the final weights and what was seen."""
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    module, optimizer, criterion, loader = dp_utils.make_private(
        module=model,
        optimizer=optimizer,
        data_loader=loader,
        noise_multiplier=0.0,
        max_grad_norm=0.1,
        **make_private_kwargs,
    )
    empty_steps = 0
    for _ in range(2):
        with dp_utils.BatchMemoryManager(
            data_loader=loader, max_physical_batch_size=2, optimizer=optimizer
        ) as batches:
            for x, y in batches:
                if len(x):
                    criterion(module(x), y).backward()
                else:
                    empty_steps += 1  # only an empty logical batch gives an empty physical one
                optimizer.step()
                optimizer.zero_grad()
    return {
        "weights": [p.detach() for p in model.parameters()],
        "seed": loader.batch_sampler.seed,
        "steps": sum(entry[2] for entry in optimizer.privacy_engine.accountant.history),
        "expected_batch_size": optimizer.expected_batch_size,
        "empty_steps": empty_steps,
    }


def _make_private_worker(rank: int) -> dict:
    model, loader = _linear_problem()
    torch.manual_seed(100 + rank)  # ranks' RNGs differ, yet the sampling seed drawn by make_private must agree
    return _train(model, loader, distributed=True)


def test_make_private_on_two_ranks_equals_one_process_over_the_same_rows(tmp_path):
    results = run_two_ranks(_make_private_worker, tmp_path)
    assert results[0]["seed"] == results[1]["seed"]
    assert [r["steps"] for r in results] == [12, 12]
    assert [r["expected_batch_size"] for r in results] == [1, 1]  # int(12 / 6) rows, per rank
    assert sum(r["empty_steps"] for r in results) > 0
    model, loader = _linear_problem()
    start = [p.detach().clone() for p in model.parameters()]
    reference = _train(model, poisson_data_loader(loader, seed=results[0]["seed"]), poisson_sampling=False)
    assert reference["steps"] == 12 and reference["expected_batch_size"] == 2
    assert all(not torch.equal(a, b) for a, b in zip(start, reference["weights"], strict=True))
    for r in results:
        for weight, expected in zip(r["weights"], reference["weights"], strict=True):
            torch.testing.assert_close(weight, expected, rtol=1e-12, atol=1e-14)


def _binomial_fit_p_value(sizes: list[int], rows: int, q: float) -> float:
    """Chi-square goodness of fit of batch sizes to Binomial(rows, q), tails pooled so each bin expects >= 5."""
    from scipy.stats import binom, chisquare

    counts = np.bincount(sizes, minlength=rows + 1).astype(float)
    expected = binom.pmf(np.arange(rows + 1), rows, q) * len(sizes)
    low, high = int(binom.ppf(0.01, rows, q)), int(binom.ppf(0.99, rows, q))
    observed = [counts[: low + 1].sum(), *counts[low + 1 : high], counts[high:].sum()]
    expected = [expected[: low + 1].sum(), *expected[low + 1 : high], expected[high:].sum()]
    return chisquare(observed, expected).pvalue


def test_batch_sizes_fit_the_binomial_law_across_ranks():
    rows, q, steps = 200, 0.05, 3000
    ranks = [PoissonBatchSampler(rows, q, steps, seed=6, rank=r, world_size=2) for r in range(2)]
    sizes = [len(a) + len(b) for a, b in zip(*ranks, strict=True)]  # the logical batch: both ranks' rows
    assert _binomial_fit_p_value(sizes, rows, q) > 1e-3
    fixed = [round(rows * q)] * steps  # a fixed batch of the same mean fails the test
    assert _binomial_fit_p_value(fixed, rows, q) < 1e-10
    honest = np.random.default_rng(0).binomial(rows, q, steps).tolist()  # a true binomial passes it
    assert _binomial_fit_p_value(honest, rows, q) > 1e-3
