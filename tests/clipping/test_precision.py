"""bf16 arithmetic keeps the guarantee: every example's clipped contribution, recomputed in float64 from the very
tensors the engine summed, has norm at most C, and not much less (the rounding margin is small)."""

import pytest
import torch
from oracle import dit_batch, dit_losses, tiny_dit
from torch import nn

import dp_utils
from benchmarks.profiling import layer_norms_in_fp32
from dp_utils.clipping.precision import NormTerms, in_dtype_rounded_down, matmul
from dp_utils.clipping.rules.conv2d import _patches
from dp_utils.clipping.rules.embedding import _indices_and_grads
from dp_utils.clipping.rules.linear import inputs_and_grads_of_calls

ROWS = 6


def per_example_grads(layer: nn.Module, pairs: list) -> dict[str, torch.Tensor]:
    """(B, *param.shape) float64 gradients of one layer from its (input, scaled output gradient) pairs."""
    if isinstance(layer, nn.Embedding):
        idx, g = _indices_and_grads(layer, pairs)
        weight = torch.zeros(len(idx), *layer.weight.shape, dtype=torch.float64)
        for b in range(len(idx)):
            weight[b].index_add_(0, idx[b].cpu(), g[b].double().cpu())
        return {"weight": weight}
    a, g = _patches(layer, pairs) if isinstance(layer, nn.Conv2d) else inputs_and_grads_of_calls(pairs)
    a, g = a.double().cpu(), g.double().cpu()
    grads = {"weight": torch.einsum("btp,btd->bpd", g, a), "bias": g.sum(1)}
    return {name: grad for name, grad in grads.items() if getattr(layer, name) is not None}


def clipped_contributions(tmp_path, mode: str, max_grad_norm: float, device: str = "cpu") -> torch.Tensor:
    """Norms of each example's clipped contribution as the engine summed it, from a bf16 autocast step."""
    model = tiny_dit(tmp_path, num_attention_heads=4, attention_head_dim=16, sample_size=16).to(device)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.arange(ROWS)), batch_size=ROWS)
    _, optimizer, criterion, _ = dp_utils.make_private(
        module=model,
        optimizer=torch.optim.SGD(model.parameters(), lr=0.0),
        data_loader=loader,
        noise_multiplier=0.0,
        max_grad_norm=max_grad_norm,
        grad_sample_mode=mode,
        poisson_sampling=False,
    )
    engine = optimizer.privacy_engine.clipping_engine
    summed: dict[tuple, torch.Tensor] = {}  # (layer, parameter name) -> (B, *shape), summed over calls
    accumulate = engine._accumulate

    def spy(layer, pairs):
        assert all(g.dtype == torch.bfloat16 for _, g in pairs if not isinstance(layer, nn.Embedding))
        for name, grad in per_example_grads(layer, pairs).items():
            summed[layer, name] = summed[layer, name] + grad if (layer, name) in summed else grad
        accumulate(layer, pairs)

    accumulate_stacked = engine._accumulate_stacked

    def spy_stacked(layers, inputs, grads, blocks):  # L layers of one shape, their pairs stacked along the rows
        for layer, a, g in zip(layers, inputs.chunk(len(layers)), grads.chunk(len(layers)), strict=True):
            assert g.dtype == torch.bfloat16
            for name, grad in per_example_grads(layer, [(a, g)]).items():
                summed[layer, name] = summed[layer, name] + grad if (layer, name) in summed else grad
        accumulate_stacked(layers, inputs, grads, blocks)

    engine._accumulate = spy
    engine._accumulate_stacked = spy_stacked
    with layer_norms_in_fp32(model), torch.autocast(device, dtype=torch.bfloat16):
        losses = dit_losses(model, *(b.to(device) for b in dit_batch(ROWS, size=16)), criterion=criterion)
    losses.backward()
    assert summed, "the engine summed nothing"
    # the engine's sums carry the optimizer's 1 / B in the clip factors: contributions in units of the sum
    return torch.sqrt(sum(grad.flatten(1).pow(2).sum(1) for grad in summed.values())) / engine.sum_scale


@pytest.mark.parametrize("mode", ["flash_bk", "flash"])
def test_bf16_contributions_are_at_most_the_clipping_norm(tmp_path, mode):
    max_grad_norm = 1e-3  # every example clipped
    norms = clipped_contributions(tmp_path, mode, max_grad_norm)
    assert (norms <= max_grad_norm).all(), norms / max_grad_norm
    assert (norms >= 0.95 * max_grad_norm).all(), norms / max_grad_norm  # the rounding margin costs little


def test_contributions_are_unclipped_below_the_norm(tmp_path):
    norms = clipped_contributions(tmp_path, "flash_bk", 1e6)
    assert (norms < 1e6).all() and (norms > 0).all()


def test_rounded_down_factor_is_the_largest_representable_one_below():
    x = torch.rand(10_000) * 2
    y = in_dtype_rounded_down(x, torch.bfloat16)
    assert y.dtype == torch.bfloat16 and (y.float() <= x).all()
    up = torch.nextafter(y, torch.full_like(y, 4.0))
    assert (up.float() > x).all()
    assert torch.equal(in_dtype_rounded_down(x, torch.float32), x)


def test_matmul_states_the_rounding_of_its_entries():
    a, b = torch.randn(3, 40, 70, dtype=torch.bfloat16), torch.randn(3, 70, 50, dtype=torch.bfloat16)
    product, error = matmul(a, b)
    assert product.dtype == torch.float32
    exact = a.double() @ b.double()
    assert ((product.double() - exact).abs() <= error / (1 - error) * product.double().abs() + 1e-6).all()
    assert matmul(a.float(), b.float())[1] == 0  # fp32 products are taken as exact


def test_upper_norm_adds_both_bounds():
    terms = NormTerms(torch.tensor([9.0]), torch.tensor([7.0]), torch.tensor([4.0]))
    torch.testing.assert_close(terms.upper_norm(), torch.tensor([6.0]))


@pytest.mark.parametrize("tokens, width", [(16, 64), (4, 8), (1, 64)], ids=["ghost-norm", "instantiated", "rank-one"])
def test_linear_rule_bounds_hold_for_the_stored_bf16_tensors(tokens, width):
    torch.manual_seed(0)
    layer = nn.Linear(width, 2 * width)
    a = (torch.randn(5, tokens, width) + 0.5).bfloat16()  # a common offset: strongly correlated tokens
    g = torch.randn(5, tokens, 2 * width).bfloat16()
    terms = dp_utils.clipping.rules.linear.linear_norm(layer, [(a, g)], dp_utils.RowGroups(None, 5))
    exact = torch.einsum("btp,btd->bpd", g.double(), a.double()).flatten(1).pow(2).sum(1) + g.double().sum(1).pow(
        2
    ).sum(1)
    if isinstance(terms.norm_sq_error, torch.Tensor):  # products rounded to bf16: within their stated bound
        assert ((terms.norm_sq.double() - exact).abs() <= terms.norm_sq_error).all()
    else:  # sums of squares in fp32 only (rank one), which the engine treats as exact
        torch.testing.assert_close(terms.norm_sq.double(), exact, rtol=1e-6, atol=0)
    c = in_dtype_rounded_down(torch.rand(5) * 0.9 + 0.05, torch.bfloat16)  # clip factors as the engine applies them
    scaled = (g * c.view(-1, 1, 1)).double()  # what the engine sums: c * g rounded once to bf16
    c = c.double()
    weight = torch.einsum("btp,btd->bpd", scaled - c.view(-1, 1, 1) * g.double(), a.double())
    bias = (scaled - c.view(-1, 1, 1) * g.double()).sum(1)
    rounding = torch.sqrt(weight.flatten(1).pow(2).sum(1) + bias.pow(2).sum(1))
    assert (rounding > 0).all()
    assert (rounding <= c * terms.scaling_error_sq.double().sqrt()).all()
