"""Each layer rule on small models: the clipped sum equals the naive loop, with reuse, 2-D to 4-D inputs,
frozen parts, rows grouped into examples, and padding rows holding NaN and inf."""

import pytest
import torch
from oracle import naive_clipped_sum, private_update, relative_error
from torch import nn

import dp_utils


class Reused(nn.Module):
    """Runs `layer` twice, on two inputs, like DiT's first embedder; `head` maps to the output."""

    def __init__(self, layer: nn.Module, head: nn.Module):
        super().__init__()
        self.layer, self.head = layer, head

    def forward(self, x, y):
        return self.head(torch.tanh(self.layer(x)) + torch.tanh(self.layer(y)).flip(-1))


class TwoBranches(nn.Module):
    """Two linear layers whose outputs are added (autograd hands both the same gradient tensor) or concatenated
    (their gradients are views of one tensor); the engine scales stored gradients in place and must not do it twice."""

    def __init__(self, join: str):
        super().__init__()
        self.left, self.right, self.head, self.join = nn.Linear(6, 5), nn.Linear(6, 5), nn.Linear(5, 3), join

    def forward(self, x):
        left, right = self.left(x), self.right(x)
        joined = left + right if self.join == "add" else torch.cat([left, right], -2)
        return self.head(torch.tanh(joined))


def linear_model(input_dims):
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 3)), (4, *input_dims, 6)


CASES = {
    "linear-2d": lambda: linear_model(()),
    "linear-3d": lambda: linear_model((7,)),
    "linear-4d": lambda: linear_model((3, 4)),
    "linear-reused": lambda: (Reused(nn.Linear(6, 5), nn.Linear(5, 3)), (4, 7, 6)),
    "linear-outputs-added": lambda: (TwoBranches("add"), (4, 7, 6)),
    "linear-outputs-concatenated": lambda: (TwoBranches("cat"), (4, 7, 6)),
    "conv2d-patch": lambda: (nn.Sequential(nn.Conv2d(3, 8, 2, stride=2), nn.Tanh(), nn.Conv2d(8, 2, 1)), (4, 3, 8, 8)),
    "conv2d-padded-dilated": lambda: (
        nn.Sequential(
            nn.Conv2d(3, 4, 3, padding=2, dilation=2, stride=(1, 2)), nn.Tanh(), nn.Conv2d(4, 2, 3, bias=False)
        ),
        (4, 3, 9, 9),
    ),
    "conv2d-reused": lambda: (Reused(nn.Conv2d(3, 3, 3, padding=1), nn.Conv2d(3, 2, 1)), (4, 3, 6, 6)),
    "layernorm": lambda: (nn.Sequential(nn.Linear(6, 5), nn.LayerNorm(5), nn.Linear(5, 2)), (4, 7, 6)),
    "layernorm-reused": lambda: (Reused(nn.LayerNorm(6), nn.Linear(6, 2)), (4, 7, 6)),
    "groupnorm": lambda: (nn.Sequential(nn.Conv2d(3, 6, 3), nn.GroupNorm(3, 6), nn.Conv2d(6, 2, 1)), (4, 3, 6, 6)),
}


def forward(model, x, y):
    return model(x, y) if isinstance(model, Reused) else model(x)


def losses_fn(model, x, y, target, criterion=dp_utils.per_sample_mse):
    return criterion(forward(model, x, y), target)


def make_case(name, dtype):
    torch.manual_seed(0)
    model, shape = CASES[name]()
    torch.manual_seed(1)
    for p in model.parameters():  # non-trivial affine parameters and biases
        p.data.normal_(0, 0.5)
    model = model.to(dtype)
    x, y = torch.randn(shape, dtype=dtype), torch.randn(shape, dtype=dtype)
    with torch.no_grad():
        target = torch.randn_like(forward(model, x, y))
    return model, (x, y, target)


def check(name, mode, max_grad_norm, dtype, tolerance, group_ids=None, freeze=None):
    model, batch = make_case(name, dtype)
    if freeze:
        freeze(model)
    rows = batch[0].shape[0]
    ids = torch.arange(rows) if group_ids is None else group_ids
    examples = len(torch.unique(ids))
    expected, norms = naive_clipped_sum(model, losses_fn, batch, max_grad_norm, ids)
    update, engine_norms = private_update(
        model,
        losses_fn,
        batch,
        max_grad_norm,
        mode,
        examples,
        **({} if group_ids is None else {"group_ids": group_ids}),
    )
    assert relative_error(update, {n: e / examples for n, e in expected.items()}) < tolerance
    torch.testing.assert_close(engine_norms.to(norms.dtype), norms, rtol=tolerance * 10, atol=0)
    return norms


@pytest.mark.parametrize("name", CASES)
@pytest.mark.parametrize("mode", ["flash_bk", "flash"])
@pytest.mark.parametrize("dtype, tolerance", [(torch.float64, 1e-10), (torch.float32, 1e-5)], ids=["fp64", "fp32"])
def test_rule_equals_naive_loop_both_regimes(name, mode, dtype, tolerance):
    norms = check(name, mode, 1e-3, dtype, tolerance)
    assert (norms > 1e-3).all()  # every example clipped
    norms = check(name, mode, 1e4, dtype, tolerance)
    assert (norms < 1e4).all()  # none clipped


@pytest.mark.parametrize("name", CASES)
@pytest.mark.parametrize("mode", ["flash_bk", "flash"])
def test_padding_rows_holding_nan_and_inf_contribute_nothing(name, mode):
    model, batch = make_case(name, torch.float64)
    real = batch[0].shape[0]
    expected, norms = naive_clipped_sum(model, losses_fn, batch, 0.3, torch.arange(real))
    padding = [torch.full((2, *b.shape[1:]), float("nan"), dtype=b.dtype) for b in batch]
    padding[0][-1] = float("inf")
    padded = tuple(torch.cat([b, pad]) for b, pad in zip(batch, padding, strict=True))
    mask = torch.arange(real + 2) < real
    update, engine_norms = private_update(model, losses_fn, padded, 0.3, mode, real, mask=mask)
    torch.testing.assert_close(engine_norms[:real], norms, rtol=1e-10, atol=0)
    assert not engine_norms[real:].any()
    assert relative_error(update, {n: e / real for n, e in expected.items()}) < 1e-10


@pytest.mark.parametrize("name", ["linear-3d", "linear-reused", "conv2d-reused", "layernorm-reused", "groupnorm"])
def test_rows_grouped_into_examples(name):
    check(name, "flash_bk", 0.3, torch.float64, 1e-10, group_ids=torch.tensor([2, 0, 2, 0]))
    check(name, "flash", 0.3, torch.float64, 1e-10, group_ids=torch.tensor([5, 5, 5, 1]))


def test_frozen_weight_trainable_bias():
    def freeze_weights(model):
        for module in model.modules():
            if isinstance(module, nn.Linear):
                module.weight.requires_grad_(False)

    check("linear-reused", "flash_bk", 0.3, torch.float64, 1e-10, freeze=freeze_weights)


class Tokens(nn.Module):
    """An embedding looked up at several positions and twice per forward, with a padding row."""

    def __init__(self):
        super().__init__()
        self.table = nn.Embedding(7, 4, padding_idx=0)
        self.head = nn.Linear(4, 2)

    def forward(self, idx):
        return self.head(self.table(idx) + self.table((idx + 1) % 7)).sum(1)


def token_losses(model, idx, target, criterion=dp_utils.per_sample_mse):
    return criterion(model(idx), target)


@pytest.mark.parametrize("mode", ["flash_bk", "flash"])
@pytest.mark.parametrize("max_grad_norm", [1e-3, 1e4])
def test_embedding_repeated_tokens_and_padding(mode, max_grad_norm):
    torch.manual_seed(0)
    model = Tokens().double()
    idx = torch.tensor([[1, 1, 3, 0], [2, 6, 6, 6], [0, 0, 5, 1]])
    target = torch.randn(3, 2, dtype=torch.float64)
    expected, _ = naive_clipped_sum(model, token_losses, (idx, target), max_grad_norm, torch.arange(3))
    update, _ = private_update(model, token_losses, (idx, target), max_grad_norm, mode, 3)
    assert relative_error(update, {n: e / 3 for n, e in expected.items()}) < 1e-10
