"""Every mode refuses, loudly, a gradient it did not clip: a parameter used outside its layer, a backward that is not
the engine's, reentrant checkpointing, a second forward before the first one's backward; and a non-finite norm stops
the step before noise and accounting."""

import pytest
import torch
import torch.nn.functional as F
from oracle import dit_batch, dit_losses, tiny_dit
from torch import nn
from torch.utils.checkpoint import checkpoint
from torch.utils.data import DataLoader, TensorDataset

import dp_utils

MODES = ["flash_bk", "flash"]


def private(model: nn.Module, mode: str, rows: int = 4, noise_multiplier: float = 0.0):
    loader = DataLoader(TensorDataset(torch.arange(rows)), batch_size=rows)
    return dp_utils.make_private(
        module=model,
        optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
        data_loader=loader,
        noise_multiplier=noise_multiplier,
        max_grad_norm=1.0,
        grad_sample_mode=mode,
        poisson_sampling=False,
    )


def no_gradients(model: nn.Module) -> bool:
    """No gradient reached any parameter (the engine's `.grad` are static views of one buffer: zero, not None)."""
    return all(p.grad is None or not p.grad.any() for p in model.parameters())


@pytest.mark.parametrize("mode", MODES)
def test_second_forward_before_backward_is_refused(tmp_path, mode):
    model = tiny_dit(tmp_path)
    model, _, criterion, _ = private(model, mode)
    x, t, y, noise = dit_batch(4)
    first = criterion(model(x, timestep=t, class_labels=y).sample[:, :4], noise)
    with pytest.raises(RuntimeError, match="second forward before the backward of the first"):
        model(x, timestep=t, class_labels=y)
    first.backward()  # the first forward is still the one the engine clips
    assert not no_gradients(model)
    with torch.no_grad():  # evaluation between steps is fine
        model(x, timestep=t, class_labels=y)


@pytest.mark.parametrize("mode", MODES)
def test_a_dropped_forward_is_forgotten(tmp_path, mode):
    model, _, criterion, _ = private(tiny_dit(tmp_path), mode)
    x, t, y, noise = dit_batch(4)
    model(x, timestep=t, class_labels=y)  # its output is dropped at once: nothing can back-propagate into it
    criterion(model(x, timestep=t, class_labels=y).sample[:, :4], noise).backward()
    assert not no_gradients(model)


class WeightOutsideItsLayer(nn.Module):
    def __init__(self):
        super().__init__()
        self.layer, self.head = nn.Linear(3, 3), nn.Linear(3, 1)

    def forward(self, x):
        return self.head(self.layer(x) + F.linear(x, self.layer.weight))  # the second use bypasses the layer's hooks


@pytest.mark.parametrize("mode", MODES)
def test_parameter_used_outside_its_layer_is_refused(mode):
    model = WeightOutsideItsLayer()
    model, _, criterion, _ = private(model, mode)
    losses = criterion(model(torch.randn(4, 3)), torch.zeros(4, 1))
    with pytest.raises(dp_utils.UnsupportedModuleError, match="'layer.weight' is used outside its module"):
        losses.backward()
    assert no_gradients(model)


@pytest.mark.parametrize("mode", MODES)
def test_weight_penalty_in_the_loss_is_refused(mode):
    model = nn.Sequential(nn.Linear(3, 3), nn.Tanh(), nn.Linear(3, 1))
    model, _, criterion, _ = private(model, mode)
    penalty = model[2].weight.pow(2).sum()

    def penalised(prediction, target):
        return dp_utils.per_sample_mse(prediction, target) + penalty

    criterion.criterion = penalised
    with pytest.raises(dp_utils.UnsupportedModuleError, match="'2.weight' is used outside its module"):
        criterion(model(torch.randn(4, 3)), torch.zeros(4, 1)).backward()


@pytest.mark.parametrize("mode", MODES)
def test_backward_outside_the_engine_is_refused(mode):
    model = nn.Sequential(nn.Linear(3, 3), nn.Tanh(), nn.Linear(3, 1))
    model, _, criterion, _ = private(model, mode)
    losses = criterion(model(torch.randn(4, 3)), torch.zeros(4, 1))
    with pytest.raises(RuntimeError, match="without the clipping engine"):
        losses.losses.sum().backward()  # the raw per-example losses, not the DPLoss
    assert no_gradients(model)


class ReentrantCheckpoint(nn.Module):
    def __init__(self):
        super().__init__()
        self.inner, self.head = nn.Linear(3, 3), nn.Linear(3, 1)

    def forward(self, x):
        return self.head(checkpoint(self.inner, x.requires_grad_(), use_reentrant=True))


@pytest.mark.parametrize("mode", MODES)
def test_reentrant_checkpointing_is_refused(mode):
    model = ReentrantCheckpoint()
    model, _, criterion, _ = private(model, mode)
    with pytest.raises(RuntimeError, match="Layer 'inner' ran without autograd inside a training forward"):
        model(torch.randn(4, 3))
    with torch.no_grad():  # evaluation is fine
        model(torch.randn(4, 3))


def test_gradient_written_by_autograd_itself_is_refused_and_dropped():
    model = nn.Sequential(nn.Linear(3, 3), nn.Tanh(), nn.Linear(3, 1))
    _, _, criterion, _ = private(model, "flash_bk")
    x = torch.randn(4, 3)
    with pytest.raises(RuntimeError, match="unclipped gradient reached '0.weight'.grad"):
        # a plain backward of another function of the same parameters, never seen by the engine's hooks
        F.linear(x, model[0].weight).sum().backward()
    assert model[0].weight.grad is None


def test_captured_input_modified_in_place_is_refused():
    class InPlace(nn.Module):
        def __init__(self):
            super().__init__()
            self.first, self.second = nn.Linear(3, 3), nn.Linear(3, 1)

        def forward(self, x):
            h = torch.tanh(self.first(x))
            out = self.second(h)
            h.mul_(2)  # the input the engine kept for `second` is no longer what `second` saw
            return out + h.sum(1, keepdim=True)

    model, _, criterion, _ = private(InPlace(), "flash_bk")
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        criterion(model(torch.randn(4, 3)), torch.zeros(4, 1)).backward()


@pytest.mark.parametrize("mode", MODES)
def test_non_finite_norm_stops_the_step_before_noise_and_accounting(tmp_path, mode):
    model = tiny_dit(tmp_path)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    model, optimizer, criterion, _ = private(model, mode, noise_multiplier=1.0)
    x, t, y, noise = dit_batch(4)
    x[2, 0, 0, 0] = float("nan")
    criterion(model(x, timestep=t, class_labels=y).sample[:, :4], noise).backward()
    with pytest.raises(FloatingPointError, match="NaN or infinite"):
        optimizer.step()
    assert optimizer.privacy_engine.accountant.history == []
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())
    optimizer.zero_grad()  # the next, finite, step goes through
    criterion(model(*dit_batch(4)[:1], timestep=t, class_labels=y).sample[:, :4], noise).backward()
    optimizer.step()
    assert len(optimizer.privacy_engine.accountant.history) == 1


def test_rows_of_a_layer_must_be_the_batch():
    class BatchSecond(nn.Module):
        def __init__(self):
            super().__init__()
            self.layer = nn.Linear(3, 1)

        def forward(self, x):  # (B, T, d) -> (T, B, d) before the layer
            return self.layer(x.transpose(0, 1)).transpose(0, 1).sum(1)

    model, _, criterion, _ = private(BatchSecond(), "flash_bk")
    with pytest.raises(ValueError, match="saw an input with 5 rows but the loss has 4"):
        criterion(model(torch.randn(4, 5, 3)), torch.zeros(4, 1)).backward()


def test_dit_trains_after_a_refused_step(tmp_path):
    """A refusal leaves the engine usable: the next forward and backward clip as usual."""
    model, _, criterion, _ = private(tiny_dit(tmp_path), "flash_bk")
    x, t, y, noise = dit_batch(4)
    with pytest.raises(RuntimeError):
        criterion(model(x, timestep=t, class_labels=y).sample[:, :4], noise).losses.sum().backward()
    losses = dit_losses(model, x, t, y, noise, criterion=criterion)
    losses.backward()
    assert not no_gradients(model)
