"""DiT loading and the parameter handling DP fine-tuning needs: presets, label table resize, label dropout."""

from __future__ import annotations

import torch
from diffusers import DiTTransformer2DModel
from diffusers.models.embeddings import LabelEmbedding

PIPELINE_NULL_CLASS = 1000  # DiTPipeline.__call__ uses class 1000 as the unconditional label

PRESETS = {  # DiT paper, Table 1 (patch size 2)
    "DiT-S/2": dict(num_layers=12, num_attention_heads=6, attention_head_dim=64),
    "DiT-B/2": dict(num_layers=12, num_attention_heads=12, attention_head_dim=64),
    "DiT-L/2": dict(num_layers=24, num_attention_heads=16, attention_head_dim=64),
    "DiT-XL/2": dict(num_layers=28, num_attention_heads=16, attention_head_dim=72),
}


def dit_from_preset(
    preset: str, in_channels: int, sample_size: int, num_classes: int, learn_sigma: bool = True
) -> DiTTransformer2DModel:
    """A randomly initialised DiT of a paper preset (the Hub checkpoints are DiT-XL/2 with learn_sigma)."""
    return DiTTransformer2DModel(
        in_channels=in_channels,
        out_channels=2 * in_channels if learn_sigma else in_channels,
        sample_size=sample_size,
        patch_size=2,
        num_embeds_ada_norm=num_classes,
        **PRESETS[preset],
    )


def label_tables(model: DiTTransformer2DModel) -> list[LabelEmbedding]:
    """Every block's class embedder (diffusers gives each block its own copy of DiT's label table)."""
    return [m for m in model.modules() if isinstance(m, LabelEmbedding)]


def resize_label_table(model: DiTTransformer2DModel, num_classes: int, keep_classes: bool = False) -> None:
    """Give every label table `num_classes` rows plus the null row, keeping the checkpoint's null row.

    The null (guidance) row carries what the checkpoint learned unconditionally. New class rows start from it, so
    every class starts at the unconditional model and DP training only learns the differences; `keep_classes`
    keeps the first rows' trained classes instead (used to pad a table back to DiTPipeline's 1000 classes).
    """
    for table in label_tables(model):
        old = table.embedding_table.weight.data
        if old.shape[0] != table.num_classes + 1:
            raise ValueError("The label table has no null row (trained without class dropout); it cannot be resized.")
        new = torch.nn.Embedding(num_classes + 1, old.shape[1], device=old.device, dtype=old.dtype)
        new.weight.data[:] = old[table.num_classes]
        if keep_classes:
            kept = min(num_classes, table.num_classes)
            new.weight.data[:kept] = old[:kept]
        new.weight.requires_grad_(table.embedding_table.weight.requires_grad)
        table.embedding_table = new
        table.num_classes = num_classes
    model.register_to_config(num_embeds_ada_norm=num_classes)


def pad_label_table_for_pipeline(model: DiTTransformer2DModel, keep_classes: bool = True) -> None:
    """DiTPipeline hard-codes the null class as id 1000: pad a smaller table with null rows so guidance works.

    Class ids 0..n-1 stay the trained classes; ids n..999 act as the null class (an embedding cannot refuse an id;
    the pipeline's `get_label_ids` refuses names that are not classes). An unconditional model
    (`keep_classes=False`) gets null rows only, so that any id samples from it.
    """
    if model.config.num_embeds_ada_norm < PIPELINE_NULL_CLASS:
        resize_label_table(model, PIPELINE_NULL_CLASS, keep_classes=keep_classes)


def disable_label_dropout(model: DiTTransformer2DModel) -> None:
    """Stop diffusers' per-block label dropout (a separate draw in every block); the trainer drops per example."""
    for table in label_tables(model):
        table.dropout_prob = 0.0


def drop_labels(labels: torch.Tensor, prob: float, null_label: int) -> torch.Tensor:
    """Classifier-free guidance dropout: each example's label becomes the null label with probability `prob`."""
    drop = torch.rand(labels.shape, device=labels.device) < prob
    return torch.where(drop, torch.full_like(labels, null_label), labels)
