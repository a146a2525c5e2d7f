"""The label table on fine-tuning: the dataset's classes matched to the checkpoint's by name, new ones initialised."""

import pytest
import torch
from diffusers import AutoencoderKL, DDPMScheduler, DiTPipeline
from oracle import tiny_dit

from dp_utils.errors import UserError
from dp_utils.training.model import checkpoint_id2label, fit_label_table, label_tables

IMAGENET_LIKE = {0: "tench, Tinca tinca", 1: "goldfish", 2: "crane", 3: "crane", 4: "great white shark, white shark"}


def tables(model):
    return [t.embedding_table.weight.detach().clone() for t in label_tables(model)]


@pytest.mark.parametrize(
    "init, expected_row",
    [("null", lambda old: old[10]), ("mean", lambda old: old[:5].mean(0)), ("White Shark", lambda old: old[4])],
)
def test_classes_kept_by_name_and_new_ones_initialised(tmp_path, init, expected_row):
    model = tiny_dit(tmp_path)  # 10 classes, 5 of them named
    old = tables(model)
    names = ["goldfish", "Tinca tinca", "crane", "zebra"]
    mapping = fit_label_table(model, names, IMAGENET_LIKE, init)
    assert mapping.kept == {0: 1, 1: 0, 2: 2} and mapping.new == [3] and not mapping.identity
    assert model.config.num_embeds_ada_norm == 4
    for before, after in zip(old, tables(model), strict=True):  # every block's own table
        assert after.shape == (5, before.shape[1])
        assert (
            torch.equal(after[0], before[1]) and torch.equal(after[1], before[0]) and torch.equal(after[2], before[2])
        )
        assert torch.equal(after[3], expected_row(before)) and torch.equal(after[4], before[10])  # null row kept
    text = mapping.describe(names)
    assert (
        "3 of 4 classes kept from the checkpoint by name" in text
        and f"1 new, initialised from {init}: 'zebra'" in text
    )


def test_same_classes_in_the_same_order_are_the_identity(tmp_path):
    model = tiny_dit(tmp_path)
    old = tables(model)
    mapping = fit_label_table(model, ["tench", "goldfish"], IMAGENET_LIKE, "null")
    assert mapping.identity and all(
        torch.equal(a, torch.cat([b[:2], b[10:]])) for a, b in zip(tables(model), old, strict=True)
    )


def test_without_class_names_rows_are_kept_by_index_only_when_the_counts_agree(tmp_path):
    model = tiny_dit(tmp_path)
    old = tables(model)
    assert fit_label_table(model, [str(k) for k in range(10)], None, "mean").identity
    assert all(torch.equal(a, b) for a, b in zip(tables(model), old, strict=True))
    mapping = fit_label_table(model, ["a", "b"], None, "mean")
    assert mapping.kept == {} and mapping.new == [0, 1] and not mapping.by_name
    assert torch.equal(tables(model)[0][1], old[0][:10].mean(0))


def test_unknown_init_class_is_refused(tmp_path):
    with pytest.raises(UserError, match="--new_class_init 'zebra': no such class in the checkpoint"):
        fit_label_table(tiny_dit(tmp_path), ["goldfish"], IMAGENET_LIKE, "zebra")
    with pytest.raises(UserError, match="it has no class names"):
        fit_label_table(tiny_dit(tmp_path), ["goldfish"], None, "goldfish")


def test_class_names_are_read_from_the_transformer_config_or_model_index(tmp_path, tiny_vae_path):
    model = tiny_dit(tmp_path)
    assert checkpoint_id2label(str(tmp_path / "dit-0"), model) is None
    model.register_to_config(id2label={0: "tench"})
    model.save_pretrained(tmp_path / "saved" / "transformer")
    reloaded = type(model).from_pretrained(tmp_path / "saved" / "transformer")
    assert checkpoint_id2label(str(tmp_path / "saved"), reloaded) == {0: "tench"}
    pipeline = DiTPipeline(tiny_dit(tmp_path), AutoencoderKL.from_pretrained(tiny_vae_path), DDPMScheduler())
    pipeline.register_to_config(id2label={"0": "tench, Tinca tinca", "1": "goldfish"})  # as the Hub's DiT has it
    pipeline.save_pretrained(tmp_path / "hub")
    transformer = type(model).from_pretrained(tmp_path / "hub" / "transformer")
    assert checkpoint_id2label(str(tmp_path / "hub"), transformer) == {0: "tench, Tinca tinca", 1: "goldfish"}
