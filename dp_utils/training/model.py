"""DiT loading and the parameter handling DP fine-tuning needs: presets, label table fitting, label dropout."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from diffusers import DiTPipeline, DiTTransformer2DModel
from diffusers.models.embeddings import LabelEmbedding

from ..errors import UserError

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


def _rebuild_label_tables(model: DiTTransformer2DModel, sources: list[list[int]]) -> None:
    """Give every label table len(sources) class rows plus the null row: row i is the mean of the old rows
    sources[i] (one row: an exact copy); the null row stays the checkpoint's."""
    null = model.config.num_embeds_ada_norm
    for table in label_tables(model):
        old = table.embedding_table.weight.data
        if old.shape[0] != table.num_classes + 1:
            raise ValueError("The label table has no null row (trained without class dropout); it cannot be resized.")
        new = torch.nn.Embedding(len(sources) + 1, old.shape[1], device=old.device, dtype=old.dtype)
        new.weight.data[:] = torch.stack([old[rows].mean(0) for rows in sources] + [old[null]])
        new.weight.requires_grad_(table.embedding_table.weight.requires_grad)
        table.embedding_table = new
        table.num_classes = len(sources)
    model.register_to_config(num_embeds_ada_norm=len(sources))


def resize_label_table(model: DiTTransformer2DModel, num_classes: int, keep_classes: bool = False) -> None:
    """Give every label table `num_classes` rows plus the null row, keeping the checkpoint's null row.

    The null (guidance) row carries what the checkpoint learned unconditionally. New class rows start from it, so
    every class starts at the unconditional model and DP training only learns the differences; `keep_classes`
    keeps the first rows' trained classes instead (used to pad a table back to DiTPipeline's 1000 classes).
    """
    old = model.config.num_embeds_ada_norm
    _rebuild_label_tables(model, [[k] if keep_classes and k < old else [old] for k in range(num_classes)])


@dataclass
class ClassMapping:
    """How the dataset's classes were matched to the checkpoint's label table rows."""

    kept: dict[int, int]  # dataset class -> checkpoint row of the same name
    new: list[int]  # dataset classes with no match, initialised by `init`
    init: str
    by_name: bool  # False: the checkpoint has no class names, rows were matched by index

    @property
    def identity(self) -> bool:
        """Every class kept at its own row: an adapter trained on this table applies to the checkpoint as it is."""
        return not self.new and all(k == row for k, row in self.kept.items())

    def describe(self, class_names: list[str]) -> str:
        how = "by name" if self.by_name else "by index (the checkpoint has no class names)"
        text = f"{len(self.kept)} of {len(class_names)} classes kept from the checkpoint {how}"
        moved = [f"{class_names[k]!r}: {row} -> {k}" for k, row in self.kept.items() if k != row]
        if moved:
            text += f" (moved: {', '.join(moved[:10])}{', ...' if len(moved) > 10 else ''})"
        if self.new:
            names = ", ".join(repr(class_names[k]) for k in self.new[:10]) + (", ..." if len(self.new) > 10 else "")
            text += f"; {len(self.new)} new, initialised from {self.init}: {names}"
        return text


def _label_names(label: str) -> list[str]:
    """A checkpoint label and its comma-separated synonyms (ImageNet's 'tench, Tinca tinca'), as DiTPipeline reads
    them; compared case-insensitively."""
    return [label.strip().casefold()] + [s.strip().casefold() for s in label.split(",")]


def find_class(name: str, id2label: dict[int, str]) -> int | None:
    """The checkpoint row named `name`: a whole label first, else a synonym; the lowest id on a tie."""
    key = name.strip().casefold()
    for names in (lambda label: _label_names(label)[:1], _label_names):
        rows = sorted(k for k, label in id2label.items() if key in names(label))
        if rows:
            return rows[0]
    return None


def match_classes(
    class_names: list[str], id2label: dict[int, str] | None, checkpoint_classes: int, new_class_init: str
) -> tuple[ClassMapping, list[list[int]]]:
    """Match the dataset's classes to checkpoint rows, by name when the checkpoint has names (else by index when the
    counts agree); returns the mapping and, per class, the checkpoint rows its new row is the mean of."""
    null = checkpoint_classes
    if id2label is not None:
        found = {k: find_class(name, id2label) for k, name in enumerate(class_names)}
        kept = {k: row for k, row in found.items() if row is not None and row < checkpoint_classes}
        class_rows = sorted(k for k in id2label if k < checkpoint_classes)
    else:
        kept = {k: k for k in range(len(class_names))} if len(class_names) == checkpoint_classes else {}
        class_rows = list(range(checkpoint_classes))
    if new_class_init == "null":
        init_rows = [null]
    elif new_class_init == "mean":
        init_rows = class_rows
    else:
        row = find_class(new_class_init, id2label) if id2label is not None else None
        if row is None or row >= checkpoint_classes:
            raise UserError(
                f"--new_class_init {new_class_init!r}: no such class in the checkpoint"
                + ("" if id2label is not None else " (it has no class names, id2label)")
                + ". Give null, mean, or one of its class names."
            )
        init_rows = [row]
    new = [k for k in range(len(class_names)) if k not in kept]
    mapping = ClassMapping(kept=kept, new=new, init=new_class_init, by_name=id2label is not None)
    return mapping, [[kept[k]] if k in kept else init_rows for k in range(len(class_names))]


def fit_label_table(
    model: DiTTransformer2DModel, class_names: list[str], id2label: dict[int, str] | None, new_class_init: str
) -> ClassMapping:
    """Refit every label table to the dataset's classes: rows of matching checkpoint classes are kept, new classes
    start from the null row, the mean of the checkpoint's class rows, or a named checkpoint class."""
    mapping, sources = match_classes(class_names, id2label, model.config.num_embeds_ada_norm, new_class_init)
    if not (mapping.identity and len(class_names) == model.config.num_embeds_ada_norm):  # else: nothing to change
        _rebuild_label_tables(model, sources)
    return mapping


def checkpoint_id2label(pretrained_model_name_or_path: str, model: DiTTransformer2DModel) -> dict[int, str] | None:
    """The checkpoint's class names: from its pipeline's model_index.json (where the trainer saves them, as
    DiTPipeline.from_pretrained reads them) or a transformer config that carries them; None when it has none. The
    one place that knows where they are saved."""
    id2label = model.config.get("id2label")
    if id2label is None:
        try:
            id2label = DiTPipeline.load_config(pretrained_model_name_or_path).get("id2label")
        except (OSError, ValueError):  # no model_index.json: a transformer and scheduler only
            id2label = None
    return {int(k): v for k, v in id2label.items()} if id2label else None


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
