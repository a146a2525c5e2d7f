"""make_private around the engine: noise, accounting, sampling and physical batches as Opacus does them."""

import pytest
import torch
from opacus.accountants import PRVAccountant, RDPAccountant
from opacus.accountants.utils import get_noise_multiplier
from opacus.data_loader import DPDataLoader
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import dp_utils


def setup(rows=8, batch_size=8, mode="flash_bk", noise_multiplier=0.0, max_grad_norm=1.0, **kwargs):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 16), nn.Tanh(), nn.Linear(16, 3)).double()
    data = TensorDataset(torch.randn(rows, 5, dtype=torch.float64), torch.randn(rows, 3, dtype=torch.float64))
    optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
    return model, dp_utils.make_private(
        module=model,
        optimizer=optimizer,
        data_loader=DataLoader(data, batch_size=batch_size),
        noise_multiplier=noise_multiplier,
        max_grad_norm=max_grad_norm,
        grad_sample_mode=mode,
        **kwargs,
    )


def test_noise_std_is_sigma_c_over_expected_batch():
    sigma, clip = 2.0, 0.5
    model, (module, optimizer, criterion, loader) = setup(
        rows=16, batch_size=4, noise_multiplier=sigma, max_grad_norm=clip, poisson_sampling=False
    )
    assert optimizer.expected_batch_size == 4
    x, _ = next(iter(loader))
    before = torch.cat([p.detach().flatten().clone() for p in model.parameters()])
    criterion(module(x) * 0, torch.zeros(len(x), 3, dtype=torch.float64)).backward()  # zero gradient: pure noise
    optimizer.step()
    change = before - torch.cat([p.detach().flatten() for p in model.parameters()])
    expected = sigma * clip / 4
    n = change.numel()  # 147 values; the sample std is within 4 standard errors of the truth
    assert abs(change.std().item() - expected) < 4 * expected / (2 * n) ** 0.5
    assert abs(change.mean().item()) < 4 * expected / n**0.5


@pytest.mark.parametrize("accountant, reference", [("prv", PRVAccountant), ("rdp", RDPAccountant)])
def test_epsilon_equals_opacus_accountant_with_the_same_history(accountant, reference):
    _, (module, optimizer, criterion, loader) = setup(
        rows=32, batch_size=4, noise_multiplier=1.1, accountant=accountant
    )
    assert optimizer.privacy_engine.get_epsilon(1e-5) == 0.0  # nothing spent before the first step
    steps = 0
    for x, y in loader:
        if len(x):
            criterion(module(x), y).backward()
        optimizer.step()
        optimizer.zero_grad()
        steps += 1
    expected = reference()
    expected.history = [(1.1, 1 / 8, steps)]
    assert steps == 8
    assert optimizer.privacy_engine.get_epsilon(1e-5) == pytest.approx(expected.get_epsilon(delta=1e-5), rel=1e-9)


def test_target_epsilon_uses_opacus_noise_calibration():
    _, (_, optimizer, _, _) = setup(
        rows=32, batch_size=4, noise_multiplier=None, target_epsilon=3.0, target_delta=1e-5, epochs=2
    )
    sigma = get_noise_multiplier(target_epsilon=3.0, target_delta=1e-5, sample_rate=1 / 8, epochs=2, accountant="prv")
    assert optimizer.noise_multiplier == pytest.approx(sigma)


def test_poisson_sampling_loader():
    _, (_, optimizer, _, loader) = setup(rows=40, batch_size=4)
    assert isinstance(loader, DPDataLoader)
    assert loader.sample_rate == pytest.approx(0.1)
    assert optimizer.expected_batch_size == 4
    sizes = {len(x) for x, _ in loader}
    assert len(sizes) > 1  # Poisson batches vary in size


def test_physical_batches_add_noise_once_and_equal_one_logical_batch():
    updates = {}
    for physical in (8, 3):
        model, (module, optimizer, criterion, loader) = setup(rows=8, batch_size=8, max_grad_norm=0.05)
        assert loader.sample_rate == 1.0  # every row in every logical batch, so both runs see the same rows
        before = [p.detach().clone() for p in model.parameters()]
        with dp_utils.BatchMemoryManager(
            data_loader=loader, max_physical_batch_size=physical, optimizer=optimizer
        ) as physical_loader:
            seen = 0
            for x, y in physical_loader:
                criterion(module(x), y).backward()
                optimizer.step()
                optimizer.zero_grad()
                seen += len(x)
        assert seen == 8
        updates[physical] = torch.cat(
            [(b - p.detach()).flatten() for b, p in zip(before, model.parameters(), strict=True)]
        )
        assert len(optimizer.privacy_engine.accountant.history) == 1
        assert optimizer.privacy_engine.accountant.history[0][2] == 1  # one noisy step
    torch.testing.assert_close(updates[3], updates[8], rtol=1e-12, atol=0)


def test_empty_poisson_batch_still_steps():
    model, (_, optimizer, _, _) = setup(rows=8, batch_size=8, noise_multiplier=1.0)
    before = [p.detach().clone() for p in model.parameters()]
    optimizer.step()  # no backward: an empty batch has nothing to clip, the noise is still added
    assert all(not torch.equal(b, p) for b, p in zip(before, model.parameters(), strict=True))
    assert len(optimizer.privacy_engine.accountant.history) == 1


def test_criterion_of_the_wrong_shape():
    _, (module, _, criterion, loader) = setup(criterion=nn.MSELoss(), poisson_sampling=False)
    x, y = next(iter(loader))
    with pytest.raises(ValueError, match=r"one loss per example, shape \(8,\).*returned \(\).*per_sample_mse"):
        criterion(module(x), y)


def test_per_sample_mse_shapes():
    losses = dp_utils.per_sample_mse(torch.ones(3, 4, 2, 2, dtype=torch.bfloat16), torch.zeros(3, 4, 2, 2))
    assert losses.shape == (3,) and losses.dtype == torch.float32
    with pytest.raises(ValueError, match="output\\[:, :C\\]"):
        dp_utils.per_sample_mse(torch.ones(3, 8, 2, 2), torch.zeros(3, 4, 2, 2))


def test_bad_arguments():
    with pytest.raises(ValueError, match="exactly one of noise_multiplier or target_epsilon"):
        setup(noise_multiplier=None)
    with pytest.raises(ValueError, match="target_delta"):
        setup(noise_multiplier=None, target_epsilon=1.0, epochs=1)
    with pytest.raises(ValueError, match="grad_sample_mode must be one of"):
        setup(mode="ghost")
    with pytest.raises(ValueError, match="noise_multiplicity > 1 needs our engine"):
        setup(mode="opacus_hooks", noise_multiplicity=2)


def test_zero_grad_keeping_tensors_then_empty_batch_then_step():
    model, (module, optimizer, criterion, loader) = setup(
        rows=8, batch_size=8, noise_multiplier=0.0, poisson_sampling=False
    )
    x, y = next(iter(loader))
    for empty in (False, True, False):  # zero_grad() keeps zeroed tensors as .grad, which must not alias the sum
        if not empty:
            criterion(module(x), y).backward()
        optimizer.step()
        optimizer.zero_grad()
    assert len(optimizer.privacy_engine.accountant.history) == 1
    assert optimizer.privacy_engine.accountant.history[0][2] == 3
