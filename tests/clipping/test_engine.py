"""The engine on tiny diffusers DiTs: every mode equals the naive per-example loop, nothing frozen."""

import pytest
import torch
from oracle import (
    dit_batch,
    dit_losses,
    naive_clipped_sum,
    noise_free_private,
    private_update,
    relative_error,
    tiny_dit,
)
from torch import nn

import dp_utils
from dp_utils.clipping.engine import ClippingEngine, trainable_layers

MODES = ["flash_bk", "flash", "opacus_hooks"]


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("max_grad_norm", [1e-3, 1e3], ids=["all-clipped", "none-clipped"])
@pytest.mark.parametrize("dtype, tolerance", [(torch.float64, 1e-10), (torch.float32, 1e-5)], ids=["fp64", "fp32"])
def test_dit_update_equals_naive_loop(tmp_path, mode, max_grad_norm, dtype, tolerance):
    rows = 5
    batch = dit_batch(rows, dtype=dtype)
    expected, norms = naive_clipped_sum(
        tiny_dit(tmp_path, dtype=dtype), dit_losses, batch, max_grad_norm, torch.arange(rows)
    )
    assert (norms > max_grad_norm).all() if max_grad_norm < 1 else (norms < max_grad_norm).all()
    model = tiny_dit(tmp_path, dtype=dtype)
    assert all(p.requires_grad for p in model.parameters())  # nothing frozen, embedders reused
    update, engine_norms = private_update(model, dit_losses, batch, max_grad_norm, mode, rows)
    assert relative_error(update, {n: e / rows for n, e in expected.items()}) < tolerance
    if engine_norms is not None:
        torch.testing.assert_close(engine_norms.to(norms.dtype), norms, rtol=tolerance * 10, atol=0)


@pytest.mark.parametrize("mode", ["flash_bk", "flash"])
@pytest.mark.parametrize("max_grad_norm", [1e-3, 1e3], ids=["all-clipped", "none-clipped"])
def test_noise_multiplicity_clips_the_rows_of_an_example_as_one(tmp_path, mode, max_grad_norm):
    examples, k = 3, 3
    x, t, y, noise = dit_batch(examples * k, dtype=torch.float64)
    x, y = x[:examples].repeat_interleave(k, 0), y[:examples].repeat_interleave(k, 0)  # K draws of one image
    batch = (x, t, y, noise)
    group_ids = torch.arange(examples).repeat_interleave(k)
    expected, _ = naive_clipped_sum(
        tiny_dit(tmp_path, dtype=torch.float64), dit_losses, batch, max_grad_norm, group_ids
    )
    update, norms = private_update(
        tiny_dit(tmp_path, dtype=torch.float64), dit_losses, batch, max_grad_norm, mode, examples, noise_multiplicity=k
    )
    assert norms.shape == (examples,)
    assert relative_error(update, {n: e / examples for n, e in expected.items()}) < 1e-10


def test_group_ids_of_unequal_sizes(tmp_path):
    group_ids = torch.tensor([4, 1, 4, 2, 1, 4])
    batch = dit_batch(len(group_ids), dtype=torch.float64)
    expected, norms = naive_clipped_sum(tiny_dit(tmp_path, dtype=torch.float64), dit_losses, batch, 0.05, group_ids)
    update, engine_norms = private_update(
        tiny_dit(tmp_path, dtype=torch.float64), dit_losses, batch, 0.05, "flash_bk", 3, group_ids=group_ids
    )
    torch.testing.assert_close(engine_norms, norms, rtol=1e-10, atol=0)
    assert relative_error(update, {n: e / 3 for n, e in expected.items()}) < 1e-10


def test_criterion_takes_the_model_output_as_it_comes(tmp_path):
    rows, max_grad_norm = 3, 0.05
    batch = dit_batch(rows, dtype=torch.float64)
    expected, _ = naive_clipped_sum(
        tiny_dit(tmp_path, dtype=torch.float64, out_channels=4), dit_losses, batch, max_grad_norm, torch.arange(rows)
    )

    def raw_output_losses(model, x, t, y, noise, criterion):  # criterion(model(x, t, y), target), as in Opacus
        return criterion(model(x, t, y), noise)

    model = tiny_dit(tmp_path, dtype=torch.float64, out_channels=4)  # no learned variance: output matches target
    update, _ = private_update(model, raw_output_losses, batch, max_grad_norm, "flash_bk", rows)
    assert relative_error(update, {n: e / rows for n, e in expected.items()}) < 1e-10


def test_dit_reuses_the_first_embedder(tmp_path):
    model = tiny_dit(tmp_path)
    engine = ClippingEngine(model, max_grad_norm=1.0)
    x, t, y, _ = dit_batch(2)
    model(x, timestep=t, class_labels=y)
    reused = sorted(engine.layers[m][0] for m, calls in engine._calls.items() if len(calls) > 1)
    assert reused == [
        "transformer_blocks.0.norm1.emb.class_embedder.embedding_table",
        "transformer_blocks.0.norm1.emb.timestep_embedder.linear_1",
        "transformer_blocks.0.norm1.emb.timestep_embedder.linear_2",
    ]


def test_opacus_ghost_runs_with_embedders_frozen_and_matches(tmp_path):
    rows, max_grad_norm = 4, 0.05
    batch = dit_batch(rows, dtype=torch.float64)
    reference = tiny_dit(tmp_path, dtype=torch.float64)
    dp_utils.freeze_embedders(reference)
    expected, _ = naive_clipped_sum(reference, dit_losses, batch, max_grad_norm, torch.arange(rows))
    for mode in ["opacus_ghost", "flash_bk"]:
        model = tiny_dit(tmp_path, dtype=torch.float64)
        dp_utils.freeze_embedders(model)
        update, _ = private_update(model, dit_losses, batch, max_grad_norm, mode, rows)
        assert relative_error(update, {n: e / rows for n, e in expected.items()}) < 1e-10


def test_bf16_autocast_norms_close_to_fp32(tmp_path):
    batch = dit_batch(4)
    norms = {}
    for autocast in (False, True):
        model = tiny_dit(tmp_path)
        engine = ClippingEngine(model, max_grad_norm=1.0, record_norms=True)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            losses = dit_losses(model, *batch)
        engine.backward(losses, dp_utils.RowGroups(None, 4))
        norms[autocast] = engine.per_example_norms
        assert norms[autocast].dtype == torch.float32
    torch.testing.assert_close(norms[True], norms[False], rtol=1e-2, atol=0)


def test_per_example_norms_are_kept_only_when_asked_for(tmp_path):
    model = tiny_dit(tmp_path)
    engine = ClippingEngine(model, max_grad_norm=1.0)
    engine.backward(dit_losses(model, *dit_batch(3)), dp_utils.RowGroups(None, 3))
    assert engine.per_example_norms is None  # derived from the private data: not kept by default
    engine.record_norms = True
    engine.backward(dit_losses(model, *dit_batch(3)), dp_utils.RowGroups(None, 3))
    assert engine.per_example_norms.shape == (3,) and (engine.per_example_norms > 0).all()


def test_unused_module_gets_zero_gradient():
    model = nn.ModuleDict({"used": nn.Linear(3, 2), "unused": nn.Linear(3, 2)}).double()
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.zeros(4)), batch_size=4)
    _, optimizer, criterion, _ = dp_utils.make_private(
        module=model,
        optimizer=torch.optim.SGD(model.parameters(), lr=1.0),
        data_loader=loader,
        noise_multiplier=0.0,
        max_grad_norm=1.0,
        poisson_sampling=False,
    )
    before = model["unused"].weight.detach().clone()
    x = torch.randn(4, 3, dtype=torch.float64)
    criterion(model["used"](x), torch.zeros(4, 2, dtype=torch.float64)).backward()
    optimizer.step()
    assert torch.equal(model["unused"].weight, before)


class _WithBatchNorm(nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(4, 4)
        self.blocks = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4))


def test_unsupported_layer_is_named_at_wrap_time():
    with pytest.raises(dp_utils.UnsupportedModuleError, match=r"'blocks\.1' \(BatchNorm1d\).*Freeze it"):
        trainable_layers(_WithBatchNorm())


def test_parameter_owned_by_the_root_is_unsupported():
    model = nn.Sequential(nn.Linear(2, 2))
    model.scale = nn.Parameter(torch.ones(2))
    with pytest.raises(dp_utils.UnsupportedModuleError, match=r"'<root module>' \(Sequential\)"):
        trainable_layers(model)


def test_extra_parameter_on_a_supported_layer_is_refused():
    layer = nn.Linear(2, 2)
    layer.gain = nn.Parameter(torch.ones(2))
    with pytest.raises(dp_utils.UnsupportedModuleError, match=r"extra parameters \['gain'\]"):
        trainable_layers(nn.Sequential(layer))


def test_tied_parameters_are_refused():
    a, b = nn.Linear(3, 3), nn.Linear(3, 3)
    b.weight = a.weight
    with pytest.raises(dp_utils.UnsupportedModuleError, match="tied"):
        trainable_layers(nn.Sequential(a, b))


def test_unfreezing_after_wrapping_is_refused():
    model = nn.Sequential(nn.Linear(3, 3), nn.BatchNorm1d(3))
    model[1].requires_grad_(False)
    engine = ClippingEngine(model, max_grad_norm=1.0)
    model[1].requires_grad_(True)
    losses = model(torch.randn(4, 3)).pow(2).sum(1)
    with pytest.raises(dp_utils.UnsupportedModuleError, match="became trainable"):
        engine.backward(losses, dp_utils.RowGroups(None, 4))


@pytest.mark.parametrize("mode", ["flash_bk", "flash"])
def test_peft_lora_adapters_equal_naive_loop(tmp_path, mode):
    from peft import LoraConfig, inject_adapter_in_model

    def lora_dit():
        model = tiny_dit(tmp_path, dtype=torch.float64)
        model.requires_grad_(False)
        config = LoraConfig(r=4, lora_alpha=8, target_modules=["to_q", "to_k", "to_v", "to_out.0", "proj_out_2"])
        model = inject_adapter_in_model(config, model)
        torch.manual_seed(2)
        for name, p in model.named_parameters():
            if "lora_B" in name:  # peft starts B at zero (a zero update): give the test a real gradient path
                p.data.normal_(0, 0.1)
        return model.double()

    rows, max_grad_norm = 4, 0.01
    batch = dit_batch(rows, dtype=torch.float64)
    expected, norms = naive_clipped_sum(lora_dit(), dit_losses, batch, max_grad_norm, torch.arange(rows))
    model = lora_dit()
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    update, engine_norms = private_update(model, dit_losses, batch, max_grad_norm, mode, rows)
    torch.testing.assert_close(engine_norms, norms, rtol=1e-10, atol=0)
    assert relative_error(update, {n: e / rows for n, e in expected.items()}) < 1e-10


class PartlyUsed(nn.Module):
    """A layer called twice, one call's output never reaching the loss: only the other call is clipped."""

    def __init__(self):
        super().__init__()
        self.layer, self.head = nn.Linear(6, 5), nn.Linear(5, 3)

    def forward(self, x):
        self.layer(x * 2)
        return self.head(torch.tanh(self.layer(x)))


@pytest.mark.parametrize("mode", ["flash_bk", "flash"])
def test_call_whose_output_never_reaches_the_loss(mode):
    x, y = torch.randn(4, 6, dtype=torch.float64), torch.randn(4, 3, dtype=torch.float64)
    torch.manual_seed(1)
    expected, _ = naive_clipped_sum(
        PartlyUsed().double(), lambda m, x, y: dp_utils.per_sample_mse(m(x), y), (x, y), 0.05, torch.arange(4)
    )
    torch.manual_seed(1)
    update, _ = private_update(
        PartlyUsed().double(), lambda m, x, y, criterion: criterion(m(x), y), (x, y), 0.05, mode, 4
    )
    assert relative_error(update, {n: e / 4 for n, e in expected.items()}) < 1e-10


def test_stacks_without_a_block_of_the_buffer_add_through_a_temporary(tmp_path, monkeypatch):
    """Where a stack's gradients are not laid out one after another, its sums reach the same views."""
    from dp_utils.clipping.flat_grads import FlatGradients

    monkeypatch.setattr(FlatGradients, "block", lambda self, run: None)
    rows = 4
    batch = dit_batch(rows, dtype=torch.float64)
    expected, _ = naive_clipped_sum(
        tiny_dit(tmp_path, dtype=torch.float64), dit_losses, batch, 0.05, torch.arange(rows)
    )
    update, _ = private_update(tiny_dit(tmp_path, dtype=torch.float64), dit_losses, batch, 0.05, "flash_bk", rows)
    assert relative_error(update, {n: e / rows for n, e in expected.items()}) < 1e-10


def test_dit_stacks_are_blocks_of_the_gradient_buffer(tmp_path):
    """The buffer, laid out from the model alone, holds each of a DiT's stacks (every block's q, k, v and out
    projections; every block's embedders but the reused first) as one block: their sums are added in place."""
    module, optimizer, criterion = noise_free_private(tiny_dit(tmp_path), 4)
    dit_losses(module, *dit_batch(4), criterion=criterion).backward()
    (plan,) = optimizer.privacy_engine.clipping_engine._plans.values()
    assert len(plan.stacks) >= 4 and all(block is not None for blocks in plan.blocks for block in blocks.values())


def test_layers_keep_the_hook_free_call_path_and_get_their_forward_back(tmp_path):
    """Calls are recorded by a wrapper of each layer's forward, not by hooks (any hook sends every call through
    nn.Module's slow path); under autocast the wrapper hands q, k and v one shared cast of their input; detach()
    puts each layer's own forward back, also one another library had set."""
    model = tiny_dit(tmp_path)
    attn = model.transformer_blocks[0].attn1
    marker = attn.to_out[0].forward  # an instance attribute, as accelerate's hooks set one
    attn.to_out[0].forward = marker
    engine = ClippingEngine(model, 1.0)
    x, t, y, _ = dit_batch(2)
    layers = [sub for sub in model.modules() if isinstance(sub, torch.nn.Linear)]
    assert all(not sub._forward_hooks and not sub._forward_pre_hooks for sub in layers)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        model(x, timestep=t, class_labels=y)
    q, k, v = (engine._calls[proj][0].input for proj in (attn.to_q, attn.to_k, attn.to_v))
    assert q.dtype == torch.bfloat16 and q is k is v
    engine._release()
    engine.detach()
    assert attn.to_out[0].forward is marker
    assert all("forward" not in sub.__dict__ for sub in layers if sub is not attn.to_out[0])
