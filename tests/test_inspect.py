"""The inspector: DiT-XL/2 from its config (nothing downloaded), a saved model folder, and refused modules."""

import json
from collections import Counter

import pytest
import torch
from conftest import TINY
from diffusers import DiTTransformer2DModel
from oracle import noise_free_private
from torch import nn

from dp_utils.inspect import build_model, dit_inputs, inspect_model, main, norm_method, parse_args
from dp_utils.training.model import PRESETS

EMBEDDER = "transformer_blocks.0.norm1.emb."


def test_dit_xl_from_its_config(capsys, tmp_path):
    report_file = tmp_path / "report.json"
    assert main(parse_args(["--model_config", "DiT-XL/2", "--batch_size", "4", "--json", str(report_file)])) == 0
    text = capsys.readouterr().out
    report = json.loads(report_file.read_text())
    with torch.device("meta"):  # the parameter count as diffusers builds the model, independently of the inspector
        reference = DiTTransformer2DModel(
            in_channels=4,
            out_channels=8,
            sample_size=32,
            patch_size=2,
            num_embeds_ada_norm=1000,
            **PRESETS["DiT-XL/2"],
        )
    total = sum(p.numel() for p in reference.parameters())
    assert report["blocks"] == 28 and "28 transformer blocks" in text
    assert report["total_parameters"] == total == report["trainable"] + report["frozen"] and report["frozen"] == 0
    assert f"= {total:,}" in text
    layers = {layer["name"]: layer for layer in report["layers"]}
    reused = {name: layer["calls"] for name, layer in layers.items() if layer["calls"] > 1}
    assert reused == {
        EMBEDDER + "timestep_embedder.linear_1": 2,
        EMBEDDER + "timestep_embedder.linear_2": 2,
        EMBEDDER + "class_embedder.embedding_table": 2,
    }
    assert "reused modules: transformer_blocks.0.norm1.emb (3 layers, 2 calls per forward)" in text
    # 256 px: 256 tokens of 1152 features; the conditioning layers see one token (rank one) except where reused
    assert layers["transformer_blocks.5.attn1.to_q"]["method"] == "ghost"
    assert layers["transformer_blocks.5.attn1.to_q"]["tokens"] == 256
    assert layers["transformer_blocks.5.norm1.linear"]["method"] == "rank-one"
    assert layers[EMBEDDER + "timestep_embedder.linear_2"]["tokens"] == 2
    assert (
        layers["transformer_blocks.3.attn1.to_k"]["norm_gflop"]
        < layers["transformer_blocks.3.attn1.to_q"]["norm_gflop"]
    )  # k and v reuse q's input Gram


def test_lora_on_a_saved_pipeline_folder(tmp_path, capsys):
    DiTTransformer2DModel(in_channels=4, out_channels=8, sample_size=8, **TINY).save_pretrained(
        tmp_path / "pipe" / "transformer"
    )
    args = parse_args(["--pretrained_model_name_or_path", str(tmp_path / "pipe"), "--trainable", "lora"])
    assert main(args) == 0
    text = capsys.readouterr().out
    assert "64px" in text and "2 transformer blocks" in text  # the config's sample size
    model, _ = build_model(args)
    lora = sum(p.numel() for n, p in model.named_parameters() if "lora_" in n)
    assert f"parameters: {lora:,} trainable" in text and "frozen: pos_embed.proj" in text


def test_unsupported_trainable_modules_are_named_with_the_fix():
    model = DiTTransformer2DModel(in_channels=4, out_channels=8, sample_size=8, **TINY)
    model.pos_embed.proj = nn.Conv2d(4, 16, 2, stride=2, groups=2)  # grouped: no exact rule
    model.transformer_blocks[1].ff.net[1] = nn.PReLU()  # a layer type without a rule
    report = inspect_model(model, dit_inputs(model, 2, 8), 64, "full", bf16=False)
    assert len(report.unsupported) == 2
    grouped, prelu = report.unsupported
    assert "'pos_embed.proj'" in grouped and "grouped convolution" in grouped and "requires_grad_(False)" in grouped
    assert "'transformer_blocks.1.ff.net.1'" in prelu and "PReLU" in prelu and "Freeze it" in prelu
    methods = {layer.name: layer.method for layer in report.layers}
    assert methods["pos_embed.proj"] == methods["transformer_blocks.1.ff.net.1"] == "refused"
    assert methods["transformer_blocks.1.attn1.to_q"] != "refused"


@pytest.mark.parametrize(
    "tokens, d, p, expected",
    [(1, 8, 8, "rank-one"), (3, 8, 8, "ghost"), (4, 8, 8, "instantiate")],
)
def test_norm_method_follows_the_linear_rule_cost_test(tokens, d, p, expected):
    assert norm_method("Linear", tokens, d, p, weight_trainable=True) == expected  # ghost iff T (d + p) < d p


def test_methods_are_the_ones_the_engine_runs(monkeypatch):
    """The inspector's choice against the engine's own: count the rule's rank-one and ghost paths in a real backward
    (private names of rules/linear.py: rename them here when the rule changes)."""
    from dp_utils.clipping.rules import linear

    ran, examples = Counter(), 2

    def counting(original, path):
        def run(*args, **kwargs):  # a stack of L layers is one call over L * examples rows: count its layers
            terms = original(*args, **kwargs)
            ran[path] += terms.norm_sq.numel() // examples
            return terms

        return run

    for path in ("_ghost_terms", "_rank_one_terms"):
        monkeypatch.setattr(linear, path, counting(getattr(linear, path), path))
    torch.manual_seed(0)
    model = DiTTransformer2DModel(in_channels=4, out_channels=8, sample_size=6, **TINY)  # 9 tokens
    report = inspect_model(model, dit_inputs(model, 2, 6), 48, "full", bf16=False)
    expected = Counter(layer.method for layer in report.layers if layer.kind in ("Linear", "Conv2d"))
    assert expected["ghost"] and expected["instantiate"] and expected["rank-one"]  # all three paths are exercised
    private, _, criterion = noise_free_private(model, 2)
    inputs = dit_inputs(model, 2, 6)
    inputs["hidden_states"] = torch.randn_like(inputs["hidden_states"])
    criterion(private(**inputs).sample[:, :4], torch.randn(2, 4, 6, 6)).backward()
    assert ran["_ghost_terms"] == expected["ghost"] and ran["_rank_one_terms"] == expected["rank-one"]
