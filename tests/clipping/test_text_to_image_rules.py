"""PixArt's scale_shift_table and SD3's RMSNorm: full fine-tuning and LoRA of tiny random PixArt and SD3
transformers clip exactly as the float64 one-example loop, per parameter."""

import pytest
import torch
from oracle import naive_clipped_sum, noise_free_private, private_update
from peft import LoraConfig, inject_adapter_in_model
from text_to_image import CAPTION_TOKENS, text_batch, text_losses, tiny_transformer
from torch import nn

import dp_utils
from dp_utils.clipping.engine import ClippingEngine, trainable_layers

ROWS = 4
LAST_CONTEXT_QUERY = ("transformer_blocks.1.attn.add_q_proj", "transformer_blocks.1.attn.norm_added_q")


def check_per_parameter(model_fn, kind, max_grad_norm, mode, group_ids=None, rows=ROWS, batch=None):
    """Every parameter's update (and every example's norm) equals the naive loop's to float64 precision."""
    batch = batch or text_batch(kind, rows, dtype=torch.float64)
    ids = torch.arange(rows) if group_ids is None else group_ids
    examples = len(torch.unique(ids))
    expected, norms = naive_clipped_sum(model_fn(), text_losses, batch, max_grad_norm, ids)
    kwargs = {} if group_ids is None else {"group_ids": group_ids}
    update, engine_norms = private_update(model_fn(), text_losses, batch, max_grad_norm, mode, examples, **kwargs)
    torch.testing.assert_close(engine_norms, norms, rtol=1e-10, atol=0)
    for name, grad in expected.items():
        torch.testing.assert_close(update[name], grad / examples, rtol=1e-9, atol=1e-12 * norms.max().item())
    unused = [n for n, grad in expected.items() if grad.abs().max() == 0]
    # SD3's last block keeps no context tokens: their queries reach no output; every other parameter takes part
    assert all(n.startswith(LAST_CONTEXT_QUERY) for n in unused), unused
    return norms


@pytest.mark.parametrize("kind", ["pixart", "sd3"])
@pytest.mark.parametrize("mode", ["flash_bk", "flash"])
@pytest.mark.parametrize("max_grad_norm", [1e-3, 1e4], ids=["all-clipped", "none-clipped"])
def test_full_fine_tuning_equals_naive_loop(tmp_path, kind, mode, max_grad_norm):
    def model():
        return tiny_transformer(kind, tmp_path, dtype=torch.float64)

    names = {n for n, p in model().named_parameters() if p.requires_grad}
    assert any("scale_shift_table" in n for n in names) or any("norm_q" in n for n in names)
    norms = check_per_parameter(model, kind, max_grad_norm, mode)
    assert (norms > max_grad_norm).all() if max_grad_norm < 1 else (norms < max_grad_norm).all()


@pytest.mark.parametrize("kind", ["pixart", "sd3"])
def test_rows_grouped_into_examples(tmp_path, kind):
    check_per_parameter(
        lambda: tiny_transformer(kind, tmp_path, dtype=torch.float64),
        kind,
        0.05,
        "flash_bk",
        torch.tensor([2, 0, 2, 1]),
    )


@pytest.mark.parametrize("kind", ["pixart", "sd3"])
@pytest.mark.parametrize("mode", ["flash_bk", "flash"])
def test_gradient_checkpointing(tmp_path, kind, mode):
    def model():
        m = tiny_transformer(kind, tmp_path, dtype=torch.float64)
        m.enable_gradient_checkpointing()
        return m

    check_per_parameter(model, kind, 0.05, mode)


@pytest.mark.parametrize("kind", ["pixart", "sd3"])
@pytest.mark.parametrize("mode", ["flash_bk", "flash"])
def test_peft_lora_equals_naive_loop(tmp_path, kind, mode):
    def model():
        m = tiny_transformer(kind, tmp_path, dtype=torch.float64)
        m.requires_grad_(False)
        inject_adapter_in_model(LoraConfig(r=4, lora_alpha=4, target_modules=["to_q", "to_k", "to_v", "to_out.0"]), m)
        torch.manual_seed(2)
        for name, p in m.named_parameters():
            if "lora_B" in name:  # peft starts B at zero: give A a gradient
                p.data.normal_(0, 0.1)
        return m.double()

    assert all("lora_" in n for n, p in model().named_parameters() if p.requires_grad)
    check_per_parameter(model, kind, 0.05, mode)


def test_tables_only(tmp_path):
    """Only PixArt's tables trainable: their rule alone gives the norms."""

    def model():
        m = tiny_transformer("pixart", tmp_path, dtype=torch.float64)
        for name, p in m.named_parameters():
            p.requires_grad_("scale_shift_table" in name)
        return m

    assert {type(layer).__name__ for layer in trainable_layers(model())} == {
        "PixArtTransformer2DModel",
        "BasicTransformerBlock",
    }
    check_per_parameter(model, "pixart", 0.05, "flash_bk")


class _TableUsedOtherwise(nn.Module):
    def __init__(self):
        super().__init__()
        self.scale_shift_table = nn.Parameter(torch.randn(2, 3))

    def forward(self, x):
        return x * self.scale_shift_table.sum()


def test_table_used_other_than_added_is_refused():
    from diffusers.models.attention import BasicTransformerBlock

    block = BasicTransformerBlock(6, 2, 3, norm_type="ada_norm_single")
    block.forward = _TableUsedOtherwise.forward.__get__(block)
    engine = ClippingEngine(block, max_grad_norm=1.0)
    with pytest.raises(ValueError, match="scale_shift_table' is used by SumBackward0"):
        block(torch.randn(4, 3, 6))
    engine.detach()
    assert isinstance(block.scale_shift_table, nn.Parameter)  # restored although the forward failed


def test_bf16_autocast_norms_close_to_fp32(tmp_path):
    """The tables and RMSNorm under bf16 autocast: norms within bf16 accuracy of fp32, clip bound honoured."""
    for kind in ("pixart", "sd3"):
        batch = text_batch(kind, ROWS)
        norms = {}
        for autocast in (False, True):
            model = tiny_transformer(kind, tmp_path)
            engine = ClippingEngine(model, max_grad_norm=1e4, record_norms=True)
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
                losses = text_losses(model, *batch)
            engine.backward(losses, dp_utils.RowGroups(None, ROWS))
            norms[autocast] = engine.per_example_norms
            engine.detach()
        torch.testing.assert_close(norms[True], norms[False], rtol=0.05, atol=0)


def tiny_sana(tmp_path, freeze_depthwise: bool):
    from diffusers import SanaTransformer2DModel

    torch.manual_seed(0)
    model = SanaTransformer2DModel(
        in_channels=4,
        out_channels=4,
        num_attention_heads=2,
        attention_head_dim=8,
        num_layers=2,
        num_cross_attention_heads=2,
        cross_attention_head_dim=8,
        cross_attention_dim=16,
        caption_channels=12,
        sample_size=8,
        patch_size=2,
    )
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name or "scale_shift_table" in name:
                p.normal_(1.0, 0.3)
    model.save_pretrained(tmp_path / "sana")
    model = SanaTransformer2DModel.from_pretrained(tmp_path / "sana", torch_dtype=torch.float64).train()
    if freeze_depthwise:
        for block in model.transformer_blocks:
            block.ff.conv_depth.requires_grad_(False)
    return model


def sana_losses(model, x, t, emb, mask, target, criterion=dp_utils.per_sample_mse):
    return criterion(model(x, encoder_hidden_states=emb, timestep=t, encoder_attention_mask=mask).sample, target)


def test_sana_depthwise_convolution_is_refused_by_name(tmp_path):
    with pytest.raises(dp_utils.UnsupportedModuleError, match=r"'transformer_blocks\.0\.ff\.conv_depth'.*grouped"):
        trainable_layers(tiny_sana(tmp_path, freeze_depthwise=False))


@pytest.mark.parametrize("mode", ["flash_bk", "flash"])
def test_sana_tables_and_norms_equal_naive_loop_with_the_depthwise_convolutions_frozen(tmp_path, mode):
    """Sana's tables are captured as PixArt's (its final one passed to a norm module as an argument). Sana's linear
    attention computes in float32 inside a float64 model, and its backward rounds differently for one example than
    for the batch: the loop and the engine agree to float32 precision, not float64's."""
    x, t, emb, mask, target = text_batch("pixart", ROWS, dtype=torch.float64)
    batch = (x, t, emb, mask, target)
    expected, norms = naive_clipped_sum(tiny_sana(tmp_path, True), sana_losses, batch, 0.05, torch.arange(ROWS))
    update, engine_norms = private_update(tiny_sana(tmp_path, True), sana_losses, batch, 0.05, mode, ROWS)
    torch.testing.assert_close(engine_norms, norms, rtol=1e-6, atol=0)
    tables = [n for n, e in expected.items() if "scale_shift_table" in n and e.abs().max() > 0]
    assert len(tables) == 3  # two blocks' and the model's
    scale = max(e.abs().max().item() for e in expected.values()) / ROWS
    for name, grad in expected.items():
        torch.testing.assert_close(update[name], grad / ROWS, rtol=1e-5, atol=1e-6 * scale)


def test_gradient_layout_does_not_depend_on_the_data(tmp_path):
    """Two ranks whose first batches differ in shape (a caption as long as the image's 16 tokens, then a shorter one:
    SD3's context and image projections stack together or apart) lay their gradient buffers out alike, so that the
    all-reduce sums each parameter's gradient with its own."""
    layouts = []
    for caption_tokens in (16, CAPTION_TOKENS):
        model = tiny_transformer("sd3", tmp_path, dtype=torch.float64)
        module, optimizer, criterion = noise_free_private(model, ROWS)
        x, t, _, pooled, target = text_batch("sd3", ROWS, dtype=torch.float64)
        emb = torch.randn(ROWS, caption_tokens, 12, dtype=torch.float64)
        text_losses(module, x, t, emb, pooled, target, criterion=criterion).backward()
        grads = optimizer.privacy_engine.clipping_engine.grads
        names = {p: n for n, p in model.named_parameters()}
        layouts.append([(names[p], view.storage_offset()) for p, view in grads.views.items()])
    assert sorted(layouts[0], key=lambda x: x[1]) == sorted(layouts[1], key=lambda x: x[1])
