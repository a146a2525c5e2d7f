"""Fixed-shape physical batches from make_private: exact Poisson sampling in masked batches of one shape, one noisy
step per logical batch, and the same aten ops for every physical batch (what a CUDA graph replays)."""

import pytest
import torch
from oracle import tiny_dit
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten
from torch.utils.data import DataLoader, TensorDataset

import dp_utils
from dp_utils.errors import UserError
from dp_utils.privacy.physical_batches import pad_rows

ROWS, RATE, SIZE = 48, 0.25, 5


def dataset(rows: int = ROWS) -> TensorDataset:
    g = torch.Generator().manual_seed(0)
    x, noise = torch.randn(rows, 4, 8, 8, generator=g), torch.randn(rows, 4, 8, 8, generator=g)
    return TensorDataset(
        x, torch.randint(0, 1000, (rows,), generator=g), torch.randint(0, 10, (rows,), generator=g), noise
    )


def private_dit(tmp_path, **kwargs):
    model = tiny_dit(tmp_path)
    return model, *dp_utils.make_private(
        module=model,
        optimizer=torch.optim.AdamW(model.parameters(), lr=1e-3),
        data_loader=DataLoader(dataset(), batch_size=12),
        sample_rate=RATE,
        max_grad_norm=1.0,
        sampling_seed=7,
        **{"noise_multiplier": 1.0, "max_physical_batch_size": SIZE, **kwargs},
    )


class AtenOps(TorchDispatchMode):
    """The aten ops dispatched, each with the shapes and dtypes of its tensor arguments."""

    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        tensors = [t for t in tree_flatten((args, kwargs or {}))[0] if isinstance(t, torch.Tensor)]
        self.ops.append((str(func), tuple((tuple(t.shape), t.dtype) for t in tensors)))
        return func(*args, **(kwargs or {}))


def test_every_physical_batch_dispatches_the_same_ops(tmp_path):
    """Logical batches of different Poisson sizes, each in several masked physical batches: one op sequence. The
    first logical batch builds the plan (and lays the gradient buffer out by stack) and AdamW's state: it is the
    warm-up, as before a capture; the two after it are recorded."""
    _, module, optimizer, criterion, loader = private_dit(tmp_path)
    sequences, logical_sizes, steps, rows = [], [], [], 0
    for batch, mask in loader:
        x, t, y, noise = batch
        assert x.shape[0] == SIZE and mask.shape == (SIZE,)
        rows += int(mask.sum())
        with AtenOps() as ops:
            criterion(module(x, timestep=t, class_labels=y).sample[:, :4], noise, mask=mask).backward()
        skipped, warm_up = optimizer._skip_next, not optimizer.privacy_engine.accountant.history
        with AtenOps() as step_ops:
            optimizer.step()
        optimizer.zero_grad()
        if not warm_up:
            sequences.append(ops.ops)
        if not skipped:
            steps.append(step_ops.ops)
            logical_sizes.append(rows)
            rows = 0
        if len(steps) == 3:
            break
    assert len(set(logical_sizes[1:])) > 1 and len(sequences) >= 4, (logical_sizes, len(sequences))
    assert all(ops == sequences[0] for ops in sequences[1:])
    assert len(sequences[0]) > 100 and not any("_local_scalar_dense" in name for name, _ in sequences[0])
    assert steps[1] == steps[2]  # the noisy steps too


def test_physical_batches_follow_the_poisson_draw_and_step_once_per_logical_batch(tmp_path):
    _, module, optimizer, criterion, loader = private_dit(tmp_path)
    drawn = [len(batch) for batch in loader.data_loader.batch_sampler]  # the sampler's draws, replayed below
    per_logical, rows, count = [], 0, 0
    for (x, t, y, noise), mask in loader:
        rows, count = rows + int(mask.sum()), count + 1
        assert mask[: int(mask.sum())].all()  # the drawn rows first, then the padding
        criterion(module(x, timestep=t, class_labels=y).sample[:, :4], noise, mask=mask).backward()
        last = not optimizer._skip_next
        optimizer.step()
        optimizer.zero_grad()
        if last:
            per_logical.append((rows, count))
            rows, count = 0, 0
    history = optimizer.privacy_engine.accountant.history  # (sigma, q, steps), consecutive equal steps merged
    assert len(per_logical) == len(drawn) == sum(steps for _, _, steps in history)
    assert [r for r, _ in per_logical] != [per_logical[0][0]] * len(per_logical)  # sizes vary as Poisson draws do
    assert all(c == max(1, -(-r // SIZE)) for r, c in per_logical)  # ceil(n / P) batches, one if empty
    assert all(h[:2] == (1.0, RATE) for h in history)
    assert optimizer.expected_batch_size == RATE * ROWS


def test_pad_rows_pads_with_zeros_and_masks():
    batch = [torch.arange(6.0).view(3, 2), torch.tensor([1, 2, 3])]
    (x, y), mask = pad_rows(batch, 2, 4)
    assert torch.equal(x, torch.tensor([[4.0, 5.0], [0, 0], [0, 0], [0, 0]])) and torch.equal(
        y, torch.tensor([3, 0, 0, 0])
    )
    assert mask.tolist() == [True, False, False, False]


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(max_physical_batch_size=0), "max_physical_batch_size must be an integer >= 1"),
        (dict(sample_rate=1.5), r"sample_rate must be a number in \(0, 1\]"),
        (dict(data_loader=None, sample_rate=0.1), "both sample_rate and dataset_size"),
        (dict(dataset_size=7), "differs from the loader's dataset"),
    ],
)
def test_bad_sampling_arguments_are_refused_before_anything_is_built(kwargs, message):
    model = torch.nn.Linear(3, 1)
    arguments = dict(
        module=model,
        optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
        data_loader=DataLoader(TensorDataset(torch.randn(10, 3)), batch_size=2),
        noise_multiplier=1.0,
        max_grad_norm=1.0,
    )
    arguments.update(kwargs)
    with pytest.raises(UserError, match=message):
        dp_utils.make_private(**arguments)
    assert not model._forward_hooks


def test_make_private_without_a_loader_shares_the_callers_q_and_n():
    model = torch.nn.Linear(3, 1)
    _, optimizer, _, loader = dp_utils.make_private(
        module=model,
        optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
        sample_rate=0.0449,
        dataset_size=5000,
        noise_multiplier=1.0,
        max_grad_norm=1.0,
    )
    assert loader is None and optimizer.expected_batch_size == pytest.approx(224.5)  # q N, not rounded


def test_a_padded_batch_without_its_mask_is_refused(tmp_path):
    """Padding rows trained on would move the sum by a number of rows that depends on the Poisson draw."""
    _, module, _, criterion, loader = private_dit(tmp_path)
    (x, t, y, noise), _ = next(iter(loader))
    with pytest.raises(UserError, match="pass its mask, criterion\\(prediction, target, mask=mask\\)"):
        criterion(module(x, timestep=t, class_labels=y).sample[:, :4], noise)


def test_a_physical_batch_without_its_step_is_refused(tmp_path):
    """Backward after backward with one step at the end would noise and account several logical batches as one."""
    _, module, _, criterion, loader = private_dit(tmp_path)
    with pytest.raises(UserError, match=r"Call optimizer.step\(\) .* after every physical batch"):
        for (x, t, y, noise), mask in loader:
            criterion(module(x, timestep=t, class_labels=y).sample[:, :4], noise, mask=mask).backward()


def test_a_logical_batch_left_early_is_dropped_not_added_to_the_next_step(tmp_path):
    _, module, optimizer, criterion, loader = private_dit(tmp_path, noise_multiplier=0.0)
    optimizer.zero_grad()
    for (x, t, y, noise), mask in loader:
        criterion(module(x, timestep=t, class_labels=y).sample[:, :4], noise, mask=mask).backward()
        assert optimizer._skip_next  # the first logical batch has more physical batches than this one
        optimizer.step()
        optimizer.zero_grad()  # after a skipped step: the sums stay
        break
    assert all(p.grad.abs().sum() == 0 for p in module.parameters())  # dropped when the loop was left
    assert not optimizer._skip_next and not optimizer.privacy_engine.accountant.history


def test_a_physical_batch_is_never_padded_past_the_dataset_size(tmp_path):
    """A Poisson batch never holds more than N rows: rows past N would only ever be padding."""
    _, _, _, _, loader = private_dit(tmp_path, max_physical_batch_size=10 * ROWS)
    (x, *_), mask = next(iter(loader))
    assert len(x) == len(mask) == ROWS


def test_a_logical_batch_of_an_iterator_left_open_is_dropped_when_the_loader_starts_again(tmp_path):
    _, module, optimizer, criterion, loader = private_dit(tmp_path, noise_multiplier=0.0)
    optimizer.zero_grad()
    left_open = iter(loader)  # never closed: both iterators stay alive to the end of the test
    (x, t, y, noise), mask = next(left_open)
    criterion(module(x, timestep=t, class_labels=y).sample[:, :4], noise, mask=mask).backward()
    optimizer.step()  # skipped: the logical batch has more physical batches
    optimizer.zero_grad()
    assert optimizer.mid_logical_batch and any(p.grad.any() for p in module.parameters())
    restarted = iter(loader)
    next(restarted)
    assert all(p.grad.abs().sum() == 0 for p in module.parameters())
