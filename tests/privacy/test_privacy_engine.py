"""make_private around the engine: noise, accounting, sampling and physical batches as Opacus does them."""

import warnings

import numpy as np
import pytest
import torch
from opacus.accountants import PRVAccountant, RDPAccountant
from opacus.accountants.utils import get_noise_multiplier
from opacus.data_loader import DPDataLoader
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import dp_utils
from dp_utils.errors import UserError
from dp_utils.privacy import noise as noise_module
from dp_utils.privacy import optimizer as optimizer_module
from dp_utils.privacy.noise import NoiseError
from dp_utils.privacy.privacy_engine import PrivacyWarning

# Most tests here use the whole dataset as the logical batch on purpose (every row in every step); the warning it
# deserves is tested in test_whole_dataset_batches_warn_that_there_is_no_subsampling.
pytestmark = pytest.mark.filterwarnings(
    "ignore:The logical batch covers the whole dataset:dp_utils.privacy.privacy_engine.PrivacyWarning"
)


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


@pytest.mark.filterwarnings("ignore:Optimal order is the largest alpha")  # from the reference call to Opacus
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
    with pytest.raises(UserError, match=r"one loss per example, shape \(8,\).*returned \(\).*per_sample_mse"):
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


def _hooks(model: nn.Module) -> int:
    return sum(
        len(m._forward_hooks) + len(m._forward_pre_hooks) + len(m._backward_hooks) + len(m._backward_pre_hooks)
        for m in model.modules()
    )


NAN, INF = float("nan"), float("inf")
TARGET = {"noise_multiplier": None, "target_epsilon": 3.0, "target_delta": 1e-5, "epochs": 1}


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"noise_multiplier": -1.0}, r"noise_multiplier must be a finite number in \[0, 1e\+06\], got -1.0"),
        ({"noise_multiplier": NAN}, "noise_multiplier must be a finite number"),
        ({"noise_multiplier": INF}, "noise_multiplier must be a finite number"),
        ({"noise_multiplier": "1.0"}, "noise_multiplier must be a finite number"),
        ({"max_grad_norm": NAN}, r"max_grad_norm \(the clipping bound C\) must be a finite number > 0, got nan"),
        ({"max_grad_norm": INF}, "max_grad_norm .* must be a finite number > 0"),
        ({"max_grad_norm": 0.0}, "max_grad_norm .* must be a finite number > 0"),
        ({"max_grad_norm": -1.0}, "max_grad_norm .* must be a finite number > 0"),
        ({**TARGET, "target_epsilon": 0.0}, "target_epsilon must be a finite number > 0, got 0.0"),
        ({**TARGET, "target_epsilon": -1.0}, "target_epsilon must be a finite number > 0"),
        ({**TARGET, "target_epsilon": INF}, "target_epsilon must be a finite number > 0"),
        ({**TARGET, "target_delta": 0.0}, r"target_delta in \(0, 1\), got 0.0.*well below 1 / \(dataset size\)"),
        ({**TARGET, "target_delta": 1.0}, r"target_delta in \(0, 1\), got 1.0"),
        ({**TARGET, "target_delta": NAN}, r"target_delta in \(0, 1\)"),
        ({**TARGET, "epochs": 0}, "epochs must be an integer >= 1, got 0"),
        ({**TARGET, "epochs": 1.5}, "epochs must be an integer >= 1, got 1.5"),
        ({**TARGET, "epochs": None, "steps": -3}, "steps must be an integer >= 1, got -3"),
        ({**TARGET, "steps": 10}, "exactly one of epochs or steps"),
        ({"noise_multiplicity": 0}, "noise_multiplicity must be an integer >= 1"),
        ({"noise_multiplicity": 1.5}, "noise_multiplicity must be an integer >= 1"),
        ({"mode": "ghost"}, "grad_sample_mode must be one of"),
        ({"accountant": "moments"}, r"accountant must be one of \('prv', 'rdp', 'gdp'\), got 'moments'"),
        ({"distributed": True}, "distributed=True needs torch.distributed initialised"),
        ({"noise_generator": 123}, "noise_generator must be a torch.Generator .*, got int"),
        ({"sampling_seed": -1}, "sampling_seed must be an integer >= 0 .*, got -1"),
        ({"sampling_seed": 1.5}, "sampling_seed must be an integer >= 0 .*, got 1.5"),
        ({"sampling_seed": True}, "sampling_seed must be an integer >= 0 .*, got True"),
        ({"sampling_seed": "abc"}, "sampling_seed must be an integer >= 0 .*, got 'abc'"),
    ],
)
def test_invalid_arguments_raise_user_error_before_the_model_is_touched(kwargs, message):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 16), nn.Tanh(), nn.Linear(16, 3))
    state = {k: v.clone() for k, v in model.state_dict().items()}
    mode = kwargs.pop("mode", "flash_bk")
    arguments = {"noise_multiplier": 1.0, "max_grad_norm": 1.0, **kwargs}
    loader = DataLoader(TensorDataset(torch.randn(8, 5), torch.randn(8, 3)), batch_size=2)
    with pytest.raises(UserError, match=message):
        dp_utils.make_private(
            module=model,
            optimizer=torch.optim.SGD(model.parameters(), lr=1.0),
            data_loader=loader,
            grad_sample_mode=mode,
            **arguments,
        )
    assert _hooks(model) == 0
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    assert all(p.grad is None and not hasattr(p, "summed_grad") for p in model.parameters())


def test_zero_noise_and_valid_edge_values_are_accepted():
    setup(noise_multiplier=0)  # the non-private baseline
    _, (_, optimizer, _, _) = setup(
        rows=16,
        batch_size=4,
        noise_multiplier=None,
        target_epsilon=50.0,
        target_delta=1e-5,
        steps=2.0,
        accountant="rdp",
        noise_multiplicity=1.0,
    )
    assert 0 < optimizer.noise_multiplier < 1


@pytest.mark.parametrize(
    "target, cause",
    [
        ({"target_epsilon": 1e-6, "target_delta": 1e-5}, "budget is too low"),
        ({"target_epsilon": 1.0, "target_delta": 0.9999}, "Cannot compute epsilon"),
    ],
)
@pytest.mark.filterwarnings("ignore:delta = 0.9999 is not below:dp_utils.privacy.privacy_engine.PrivacyWarning")
def test_an_unreachable_budget_names_its_values_and_the_fix(target, cause):
    model = nn.Linear(5, 3)
    with pytest.raises(UserError, match=cause) as caught:
        dp_utils.make_private(
            module=model,
            optimizer=torch.optim.SGD(model.parameters(), lr=1.0),
            data_loader=DataLoader(TensorDataset(torch.randn(40, 5), torch.randn(40, 3)), batch_size=4),
            max_grad_norm=1.0,
            steps=30,
            **target,
        )
    message = str(caught.value)
    assert f"target_epsilon = {target['target_epsilon']}" in message
    assert f"target_delta = {target['target_delta']}" in message
    assert "over 30 steps at sample rate q = 0.1 " in message
    assert "larger epsilon" in message and "fewer steps" in message and "smaller logical batch" in message
    assert _hooks(model) == 0


def test_get_epsilon_refuses_a_delta_outside_0_1():
    _, (module, optimizer, criterion, loader) = setup(rows=32, batch_size=4, noise_multiplier=1.0, accountant="rdp")
    optimizer.step()
    for delta in (0.0, 1.0, -0.5, NAN):
        with pytest.raises(UserError, match=r"delta must be in \(0, 1\)"):
            optimizer.privacy_engine.get_epsilon(delta)


def _take_failing_step(monkeypatch, mode="flash_bk", **kwargs):
    """One step whose noise draw fails; the model, its parameters, the clipped sums and the optimizer."""
    model, (module, optimizer, criterion, loader) = setup(
        rows=16, batch_size=4, noise_multiplier=1.0, poisson_sampling=False, mode=mode, **kwargs
    )

    def add_noise(*args, **kwargs):
        raise RuntimeError("injected noise failure")

    monkeypatch.setattr(optimizer_module, "add_noise_foreach_", add_noise)
    x, y = next(iter(loader))
    criterion(module(x), y).backward()
    before = [p.detach().clone() for p in model.parameters()]
    sums = [p.grad.clone() for p in model.parameters()]
    with pytest.raises(RuntimeError, match="injected noise failure"):
        optimizer.step()
    monkeypatch.undo()
    return model, module, optimizer, criterion, loader, before, sums


def test_a_noise_failure_raises_in_step_before_accounting_and_changes_no_weight(monkeypatch):
    model, module, optimizer, criterion, loader, before, sums = _take_failing_step(monkeypatch)
    assert optimizer.privacy_engine.accountant.history == []
    assert all(torch.equal(b, p) for b, p in zip(before, model.parameters(), strict=True))
    assert all(torch.equal(s, p.grad) for s, p in zip(sums, model.parameters(), strict=True))
    with pytest.raises(ValueError, match="haven't been cleared"):  # a retry would reuse sums meant for one step
        optimizer.step()
    assert optimizer.privacy_engine.accountant.history == []
    optimizer.zero_grad()
    x, y = next(iter(loader))
    criterion(module(x), y).backward()
    optimizer.step()
    assert len(optimizer.privacy_engine.accountant.history) == 1
    assert all(not torch.equal(b, p) for b, p in zip(before, model.parameters(), strict=True))


def test_noise_drawn_ahead_that_fails_stops_the_next_backward_and_leaves_no_partial_noise(monkeypatch):
    """On CPU zero_grad draws the next step's noise into the buffers on a worker: its failure reaches the caller
    at the next backward, and the buffers are left zero (the step would then add the noise in full)."""
    model, (module, optimizer, criterion, loader) = setup(
        rows=16, batch_size=4, noise_multiplier=1.0, poisson_sampling=False
    )

    def failing(draws, entropy, std):
        draws[0].view(-1)[:3].normal_()
        raise RuntimeError("injected noise failure")

    monkeypatch.setattr(noise_module, "_draw_into", failing)
    optimizer.zero_grad()
    x, y = next(iter(loader))
    with pytest.raises(NoiseError, match="injected noise failure"):
        criterion(module(x), y).backward()
    assert all(not p.grad.any() for p in model.parameters())
    assert optimizer.privacy_engine.accountant.history == []


def test_a_second_step_without_zero_grad_is_refused():
    model, (module, optimizer, criterion, loader) = setup(
        rows=16, batch_size=4, noise_multiplier=1.0, poisson_sampling=False
    )
    x, y = next(iter(loader))
    criterion(module(x), y).backward()
    optimizer.step()
    after = [p.detach().clone() for p in model.parameters()]
    criterion(module(x), y).backward()
    with pytest.raises(ValueError, match="call optimizer.zero_grad\\(\\) after every optimizer.step\\(\\)"):
        optimizer.step()
    assert len(optimizer.privacy_engine.accountant.history) == 1
    assert all(torch.equal(a, p) for a, p in zip(after, model.parameters(), strict=True))


def test_secure_mode_noise_has_the_asked_std():
    sigma, clip = 2.0, 0.5
    torch.manual_seed(0)
    model = nn.Linear(100, 50).double()
    data = TensorDataset(torch.randn(16, 100, dtype=torch.float64), torch.randn(16, 50, dtype=torch.float64))
    engine = dp_utils.PrivacyEngine(secure_mode=True)
    _, optimizer, _, _ = engine.make_private(
        module=model,
        optimizer=torch.optim.SGD(model.parameters(), lr=1.0),
        data_loader=DataLoader(data, batch_size=4),
        noise_multiplier=sigma,
        max_grad_norm=clip,
        poisson_sampling=False,
    )
    before = torch.cat([p.detach().flatten().clone() for p in model.parameters()])
    optimizer.step()  # no gradient: pure noise
    change = before - torch.cat([p.detach().flatten() for p in model.parameters()])
    expected, n = sigma * clip / 4, change.numel()
    assert abs(change.std().item() - expected) < 4 * expected / (2 * n) ** 0.5
    assert len(engine.accountant.history) == 1


def test_whole_dataset_batches_warn_that_there_is_no_subsampling():
    with pytest.warns(PrivacyWarning, match=r"sample rate q = 1, N = 8 rows\): there is no privacy amplification"):
        setup(rows=8, batch_size=8)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        setup(rows=16, batch_size=4)  # q = 1/4: no warning


def test_a_sample_rate_the_callers_own_batches_do_not_have_warns():
    with pytest.warns(PrivacyWarning, match=r"sample_rate = 0.1 is accounted.*4 per epoch \(rate 0.25\)"):
        setup(rows=16, batch_size=4, poisson_sampling=False, sample_rate=0.1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        setup(rows=16, batch_size=4, poisson_sampling=False, sample_rate=0.25)  # what the loader does: no warning
        setup(rows=16, batch_size=4, sample_rate=0.1)  # Poisson sampling at q: the loader is rebuilt at that rate


def test_the_criterion_refuses_a_prediction_that_is_no_tensor_and_losses_outside_autograd():
    model, (module, _, criterion, _) = setup()
    x, target = torch.randn(8, 5, dtype=torch.float64), torch.randn(8, 3, dtype=torch.float64)
    with pytest.raises(UserError, match="first argument must be the model's prediction.*got list"):
        criterion([module(x)], target)
    detached = criterion(module(x).detach(), target)
    with pytest.raises(UserError, match="losses do not depend on the model's parameters"):
        detached.backward()
    assert all(p.grad is None or not p.grad.any() for p in model.parameters())


def test_a_delta_of_1_over_n_or_more_warns_once():
    with pytest.warns(PrivacyWarning, match=r"delta = 0.1 is not below 1 / N = 0.0625 \(N = 16 rows\).*e.g. 0.0063"):
        _, (_, optimizer, _, _) = setup(
            rows=16, batch_size=4, noise_multiplier=None, target_epsilon=5.0, target_delta=0.1, steps=3
        )
    optimizer.step()
    engine = optimizer.privacy_engine
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        engine.get_epsilon(0.1)  # warned already, in make_private
        engine.get_epsilon(1e-3)  # below 1/N
    with pytest.warns(PrivacyWarning, match="delta = 0.5 is not below"):
        engine.get_epsilon(0.5)


@pytest.mark.parametrize("accountant, noise_multiplier, batch_size", [("prv", 1.0, 16), ("rdp", 1e4, 4)])
def test_accountant_numerics_warnings_are_silenced(accountant, noise_multiplier, batch_size):
    """PRV at q = 1 (numpy's divide by zero in log) and RDP at a large sigma ("Optimal order is the largest alpha")."""
    q = 4 / 16 if batch_size == 4 else 1.0
    reference = {"prv": PRVAccountant, "rdp": RDPAccountant}[accountant]()
    reference.history = [(noise_multiplier, q, 2)]
    with pytest.warns(RuntimeWarning if accountant == "prv" else UserWarning):  # what Opacus says on its own
        with np.errstate(divide="warn"):
            expected = reference.get_epsilon(1e-3)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=PrivacyWarning)  # q = 1 is warned once, on purpose
        _, (_, optimizer, _, _) = setup(
            rows=16, batch_size=batch_size, noise_multiplier=noise_multiplier, accountant=accountant
        )
    optimizer.step()
    optimizer.zero_grad()
    optimizer.step()
    with warnings.catch_warnings(), np.errstate(divide="warn"):
        warnings.simplefilter("error")
        assert optimizer.privacy_engine.get_epsilon(1e-3) == pytest.approx(expected)


def test_opacus_hooks_backward_does_not_warn_about_full_backward_hooks():
    model, (module, optimizer, criterion, loader) = setup(
        rows=16, batch_size=4, mode="opacus_hooks", poisson_sampling=False
    )
    x, y = next(iter(loader))
    with pytest.warns(UserWarning, match="Full backward hook is firing"):  # Opacus' own backward warns
        ((module(x) - y) ** 2).sum(dim=1).mean().backward()
    optimizer.zero_grad()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        criterion(module(x), y).backward()
    optimizer.step()
    assert len(optimizer.privacy_engine.accountant.history) == 1


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


def test_low_noise_is_refused_with_the_prv_accountant_before_it_hangs():
    """Opacus' PRV accountant takes minutes per epsilon below sigma ~0.2: refused at once, with the way out."""
    with pytest.raises(UserError, match="needs a noise multiplier below 0.3125.*--accountant rdp"):
        setup(rows=400, batch_size=4, noise_multiplier=None, target_epsilon=1000, target_delta=1e-5, steps=1000)
    with pytest.raises(UserError, match="noise_multiplier = 0.1 is below 0.2.*--accountant rdp"):
        setup(rows=400, batch_size=4, noise_multiplier=0.1)
    _, (_, optimizer, _, _) = setup(
        rows=400,
        batch_size=4,
        noise_multiplier=None,
        target_epsilon=1000,
        target_delta=1e-5,
        steps=1000,
        accountant="rdp",
    )
    assert 0 < optimizer.noise_multiplier < 0.3125


@pytest.mark.parametrize("mode", ["flash_bk", "flash"])
def test_noise_is_drawn_once_per_logical_batch_whatever_the_physical_split(mode):
    """The same noise generator state gives the same update for 1, 2 or 8 pieces: one draw, after the last."""
    from dp_utils.privacy.randomness import generator_from_entropy

    updates = []
    for piece in (8, 4, 1):
        model, (module, optimizer, criterion, loader) = setup(
            rows=8, mode=mode, noise_multiplier=1.0, poisson_sampling=False, noise_generator=generator_from_entropy(9)
        )
        before = [p.detach().clone() for p in model.parameters()]
        x, y = next(iter(loader))
        for start in range(0, len(x), piece):
            criterion(module(x[start : start + piece]), y[start : start + piece]).backward()
        optimizer.step()
        updates.append(
            torch.cat([(b - p.detach()).flatten() for b, p in zip(before, model.parameters(), strict=True)])
        )
        assert optimizer.privacy_engine.accountant.history == [(1.0, 1.0, 1)]
    torch.testing.assert_close(updates[1], updates[0], rtol=0, atol=1e-12)
    torch.testing.assert_close(updates[2], updates[0], rtol=0, atol=1e-12)
