"""What DP fine-tuning trains: attention-only selection, peft LoRA adapters, their refusals and their merge."""

import pytest
import torch
from diffusers.models.attention_processor import Attention
from oracle import dit_batch, tiny_dit
from peft import LoraConfig
from peft.tuners.tuners_utils import BaseTunerLayer

from dp_utils.clipping.freezing import EMBEDDERS
from dp_utils.errors import UserError
from dp_utils.training.adapters import add_lora, fold_block_index, merge_lora, select_trainable, trained_parameters


def test_dora_magnitude_vector_is_refused_by_name(tmp_path):
    with pytest.raises(UserError, match=r"DoRA.*lora_magnitude_vector"):
        add_lora(tiny_dit(tmp_path), LoraConfig(r=2, target_modules=["to_q"], use_dora=True))


@pytest.mark.parametrize(
    "target, message",
    [
        ("nothing", "--lora_target_modules nothing: Target modules {'nothing'} not found"),
        ("norm_out", "--lora_target_modules norm_out: Target module LayerNorm.* is not supported"),
        ("embedding_table", r"lora_embedding_A' \(ParameterDict\).*per-example clipping does not support it"),
    ],
    ids=["no-match", "not-adaptable", "not-clippable"],
)
def test_adapters_the_engine_cannot_clip_are_refused(tmp_path, target, message):
    with pytest.raises(UserError, match=message):
        add_lora(tiny_dit(tmp_path), LoraConfig(r=2, target_modules=[target]))


def test_attention_mode_trains_attention_modules_and_optionally_embedders(tmp_path):
    for train_embedders in (False, True):
        model = tiny_dit(tmp_path)
        select_trainable(model, "attention", train_embedders, None)
        kinds = (Attention, *EMBEDDERS) if train_embedders else (Attention,)
        owners = {n for n, m in model.named_modules() if isinstance(m, kinds)}
        for name, p in model.named_parameters():
            assert p.requires_grad == any(name.startswith(f"{o}.") for o in owners), name


def test_merge_gives_a_plain_dit_with_the_adapted_outputs(tmp_path):
    model = tiny_dit(tmp_path, dtype=torch.float64).eval()
    add_lora(model, LoraConfig(r=2, lora_alpha=4, target_modules=["to_q", "to_v", "proj_out_2"]))
    torch.manual_seed(1)
    for name, p in model.named_parameters():
        if "lora_B" in name:
            p.data.normal_()
    x, t, y, _ = dit_batch(3, dtype=torch.float64)
    with torch.no_grad():
        adapted = model(x, timestep=t, class_labels=y).sample
        plain = tiny_dit(tmp_path, dtype=torch.float64).eval()(x, timestep=t, class_labels=y).sample
        assert not torch.allclose(adapted, plain)
        merge_lora(model)
        assert not any(isinstance(m, BaseTunerLayer) for m in model.modules()) and not hasattr(model, "peft_config")
        assert isinstance(model.proj_out_2, torch.nn.Linear)
        torch.testing.assert_close(model(x, timestep=t, class_labels=y).sample, adapted, rtol=1e-12, atol=1e-12)


def test_trained_parameters_count_lora_and_fold_block_indices(tmp_path):
    model = tiny_dit(tmp_path)
    select_trainable(model, "lora", False, LoraConfig(r=3, target_modules=["to_k"]))
    trained = trained_parameters(model, "lora", [])
    assert trained.trained_parameters == 2 * (16 * 3 + 3 * 16)  # A (3, 16) and B (16, 3) in each of 2 blocks
    assert trained.trained == [
        "transformer_blocks.*.attn1.to_k.lora_A.default.weight",
        "transformer_blocks.*.attn1.to_k.lora_B.default.weight",
    ]
    assert trained.lora == dict(rank=3, alpha=8, target_modules=["to_k"])
    assert (
        fold_block_index("transformer_blocks.11.attn1.to_out.0.weight") == "transformer_blocks.*.attn1.to_out.0.weight"
    )
