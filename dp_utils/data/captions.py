"""Captions of a text-to-image latent cache: read beside the images, encoded once by the pipeline's frozen text
encoders, stored in each image's row; and the dataset the trainer reads them from.

The unit of privacy is one (image, caption) row: the caption's encoding lives in the image's row, as its flip does.
The encoders are the pipeline's own `encode_prompt` (PixArt-alpha/Sigma: T5 with its attention mask; SD3: two CLIP
encoders and T5, with pooled CLIP embeddings), so training sees what sampling will. Cache columns (float16):

- `prompt_embeds`: (T, D). PixArt rows keep only the caption's tokens (its mask's ones; PixArt attends to no
  padding), so T varies by row and the trainer pads a batch with masked zeros; SD3 attends to all its tokens, padding
  included, so its rows keep all of them (77 CLIP tokens + --max_sequence_length T5 tokens).
- `pooled_prompt_embeds`: (P,), SD3 only.

`empty_prompt.safetensors` in the cache holds the encoding of the empty caption "" (what the pipelines use for
classifier-free guidance), which caption dropout puts in place of a row's caption. Why encodings and not captions
encoded during training: docs/text_to_image.md.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import datasets
import numpy as np
import torch
from safetensors.torch import load_file, save_file

from ..errors import UserError
from .images import ImageSource
from .latent_cache import EMPTY_PROMPT_NAME, LatentDataset

CAPTION_PIPELINES = {  # pipeline class -> default --max_sequence_length (diffusers' scripts and pipelines)
    "PixArtAlphaPipeline": 120,
    "PixArtSigmaPipeline": 300,
    "StableDiffusion3Pipeline": 77,
}
METADATA_NAME = "metadata.jsonl"


def read_folder_captions(root: str | os.PathLike, ids: list[str], column: str) -> list[str]:
    """Each image's caption from `metadata.jsonl` in the image folder (`{"file_name": ..., "<column>": ...}` lines,
    file names relative to the folder, as `datasets`' imagefolder reads them)."""
    path = Path(root) / METADATA_NAME
    if not path.is_file():
        raise UserError(
            f"--caption_column {column}: {path} is missing. Put a {METADATA_NAME} beside the images, one line per "
            f'image: {{"file_name": "{ids[0]}", "{column}": "a caption"}}.'
        )
    captions = {}
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            entry = json.loads(line)
            captions[Path(entry["file_name"]).as_posix()] = entry[column]
        except (json.JSONDecodeError, KeyError, TypeError) as error:
            raise UserError(
                f"{path} line {number}: expected a JSON object with 'file_name' and '{column}' ({error!r})."
            ) from None
    missing = [i for i in ids if i not in captions]
    if missing:
        raise UserError(f"{path} has no caption for {len(missing)} images, e.g. {missing[0]}; add a line for each.")
    return check_captions([captions[i] for i in ids], ids, column)


def read_dataset_captions(dataset: datasets.Dataset, ids: list[str], column: str) -> list[str]:
    """The `column` of a dataset: one caption string per row."""
    if column not in dataset.column_names:
        raise UserError(
            f"--caption_column '{column}' is not in the dataset; available columns: {dataset.column_names}."
        )
    return check_captions(dataset.select_columns([column]).to_dict()[column], ids, column)


def check_captions(captions: list, ids: list[str], column: str) -> list[str]:
    bad = [k for k, c in enumerate(captions) if not isinstance(c, str)]
    if bad:
        raise UserError(
            f"The caption of {ids[bad[0]]} ('{column}') is {captions[bad[0]]!r}, not a string: give every image one "
            "caption (an empty string for none)."
        )
    return captions


def read_captions(source: ImageSource, args) -> ImageSource:
    """The source with its captions; a text-to-image cache has no class labels (the caption conditions)."""
    column = args.caption_column
    if args.train_data_dir is not None:
        captions = read_folder_captions(args.train_data_dir, source.ids, column)
    else:
        captions = read_dataset_captions(source.dataset, source.ids, column)
    source.captions, source.labels, source.class_names = captions, None, None
    return source


def caption_encoders(args, device: torch.device, dtype: torch.dtype) -> TextEncoders | None:
    """The text encoders of --pretrained_model_name_or_path when --caption_column is given; refuse other pipelines."""
    if args.caption_column is None:
        return None
    from diffusers import DiffusionPipeline

    path = args.pretrained_model_name_or_path
    try:
        pipeline_class = DiffusionPipeline.load_config(path, cache_dir=args.cache_dir)["_class_name"]
    except (OSError, KeyError) as error:
        raise UserError(f"--pretrained_model_name_or_path {path}: no pipeline's model_index.json ({error}).") from None
    if pipeline_class not in CAPTION_PIPELINES:
        raise UserError(
            f"--caption_column: {path} is a {pipeline_class}; captions are encoded for {sorted(CAPTION_PIPELINES)}."
        )
    max_length = args.max_sequence_length or CAPTION_PIPELINES[pipeline_class]
    kwargs = {"pretrained_model_name_or_path": path, "cache_dir": args.cache_dir}
    return TextEncoders(pipeline_class, kwargs, device, dtype, max_length, args.caption_column)


class TextEncoders:
    """A pipeline's frozen text encoders and tokenizers (no transformer, no VAE) and its `encode_prompt`."""

    def __init__(self, pipeline_class: str, kwargs: dict, device, dtype: torch.dtype, max_length: int, column: str):
        import diffusers

        cls = getattr(diffusers, pipeline_class)
        self.pixart = pipeline_class.startswith("PixArt")
        self.pipeline = cls.from_pretrained(**kwargs, transformer=None, vae=None, torch_dtype=dtype).to(device)
        self.pipeline.set_progress_bar_config(disable=True)
        self.device, self.max_length, self.pipeline_class, self.column = device, max_length, pipeline_class, column

    def describe(self) -> dict:
        """The cache_info.json entry: what encoded the captions."""
        return {
            "pipeline": self.pipeline_class,
            "caption_column": self.column,
            "max_sequence_length": self.max_length,
            "trimmed_to_caption": self.pixart,
            "empty_prompt": EMPTY_PROMPT_NAME,
        }

    @torch.no_grad()
    def encode(self, captions: list[str]) -> list[dict[str, np.ndarray]]:
        """Per caption: `prompt_embeds` (T, D) and, for SD3, `pooled_prompt_embeds` (P,), as float16 arrays."""
        if self.pixart:
            embeds, mask, _, _ = self.pipeline.encode_prompt(
                captions, do_classifier_free_guidance=False, device=self.device, max_sequence_length=self.max_length
            )
            lengths = mask.sum(1).tolist()
            return [{"prompt_embeds": _half(e[:n])} for e, n in zip(embeds, lengths, strict=True)]
        embeds, _, pooled, _ = self.pipeline.encode_prompt(
            captions, None, None, self.device, do_classifier_free_guidance=False, max_sequence_length=self.max_length
        )
        return [
            {"prompt_embeds": _half(e), "pooled_prompt_embeds": _half(p)} for e, p in zip(embeds, pooled, strict=True)
        ]

    def features(self) -> dict[str, datasets.features.FeatureType]:
        row = self.encode([""])[0]
        features = {"prompt_embeds": datasets.Array2D((None, row["prompt_embeds"].shape[1]), "float16")}
        if "pooled_prompt_embeds" in row:
            features["pooled_prompt_embeds"] = datasets.Sequence(
                datasets.Value("float16"), length=row["pooled_prompt_embeds"].shape[0]
            )
        return features

    def save_empty_prompt(self, path: Path) -> None:
        save_file({k: torch.from_numpy(v) for k, v in self.encode([""])[0].items()}, str(path))


def _half(x: torch.Tensor) -> np.ndarray:
    return x.to("cpu", torch.float16).numpy()


class CaptionedLatents(LatentDataset):
    """A text-to-image cache: items are (latent sample (C, H, W), prompt_embeds (T, D), pooled (P,) or None)."""

    def __init__(self, cache_dir: str | os.PathLike, model_config=None, random_flip: bool = True) -> None:
        super().__init__(cache_dir, model_config, null_label=0, random_flip=random_flip)
        if not self.info.get("captions"):
            raise UserError(
                f"The latent cache at {cache_dir} has no captions; re-create it with precompute_latents.py "
                "--caption_column <column> --pretrained_model_name_or_path <the text-to-image pipeline>."
            )
        self.pooled = "pooled_prompt_embeds" in self.dataset.column_names
        columns = ["prompt_embeds"] + (["pooled_prompt_embeds"] if self.pooled else [])
        self._captions = self.dataset.with_format("numpy", columns=columns)
        empty = load_file(str(Path(cache_dir) / EMPTY_PROMPT_NAME))
        self.empty_prompt = (empty["prompt_embeds"].float(), empty.get("pooled_prompt_embeds"))

    def select_random_rows(self, num_rows: int, seed: int) -> None:
        order = torch.randperm(self.num_rows, generator=torch.Generator().manual_seed(seed))
        rows = order[:num_rows].sort().values.tolist()
        self._captions = self._captions.select(rows)
        super().select_random_rows(num_rows, seed)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        sample, _ = super().__getitem__(index)
        row = self._captions[index]
        pooled = torch.tensor(row["pooled_prompt_embeds"]).float() if self.pooled else None
        return sample, torch.tensor(row["prompt_embeds"]).float(), pooled
