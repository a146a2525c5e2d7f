"""The latent cache of `precompute_latents.py`: image preprocessing, opening, checking against a DiT config, sampling.

A cache directory holds a `datasets` dataset (`datasets.load_from_disk(cache_dir)`) with one row per image:

- `mean`: float32 `(V, C, H, W)`, the VAE latent mean already multiplied by the scaling factor (pixels in [-1, 1]
  when the cache was made with `--vae none`); `V` is 2 when the mirrored image was encoded too, else 1.
- `std`: float32 `(V, C, H, W)`, the latent std times the scaling factor (absent for pixel caches).
- `label`: int64 `ClassLabel` (absent for unconditional caches).
- `source`: string, the image file (relative to the image folder) or the dataset row (`train[12]`) it came from.

and `cache_info.json`, written last, with the metadata (see `precompute_latents.py`). Every view of an image lives in
that image's row, so one row is one unit of privacy.

Images are preprocessed as DiT/ADM do (`center_crop_arr`), after becoming 8-bit RGB whatever their mode: 16-bit
greyscale is rescaled rather than clipped, transparency is composited on white, EXIF orientation is applied.
"""

import io
import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import datasets
import numpy as np
import torch
from PIL import Image, ImageOps

CACHE_INFO_NAME = "cache_info.json"
CACHE_FORMAT_VERSION = 1

SIXTEEN_BIT_MODES = {"I", "I;16", "I;16L", "I;16B", "I;16N"}
ALPHA_MODES = {"RGBA", "RGBa", "LA", "La", "PA"}


def to_rgb(image: Image.Image) -> Image.Image:
    """Convert an image of any PIL mode to 8-bit RGB: 16-bit values are rescaled, transparency goes on white."""
    if image.mode in SIXTEEN_BIT_MODES:
        # PIL's own I;16 -> L conversion clips at 255, turning most 16-bit photos white; "I" is read as 16-bit too.
        pixels = np.asarray(image, dtype=np.float64) / 257.0
        image = Image.fromarray(np.clip(np.rint(pixels), 0, 255).astype(np.uint8))
    if image.mode in ALPHA_MODES or "transparency" in image.info:
        # Dropping alpha would expose whatever colour hides under transparent pixels (often black); white is neutral.
        rgba = image.convert("RGBA")
        image = Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba)
    return image.convert("RGB")


def center_crop_arr(pil_image: Image.Image, image_size: int) -> Image.Image:
    """Resize and centre-crop as DiT/ADM do: BOX halvings while large, one BICUBIC resize, then a centre crop."""
    while min(*pil_image.size) >= 2 * image_size:
        pil_image = pil_image.resize(tuple(x // 2 for x in pil_image.size), resample=Image.BOX)
    scale = image_size / min(*pil_image.size)
    pil_image = pil_image.resize(tuple(round(x * scale) for x in pil_image.size), resample=Image.BICUBIC)
    arr = np.array(pil_image)
    crop_y = (arr.shape[0] - image_size) // 2
    crop_x = (arr.shape[1] - image_size) // 2
    return Image.fromarray(arr[crop_y : crop_y + image_size, crop_x : crop_x + image_size])


def load_image(value: str | os.PathLike | bytes | dict) -> Image.Image:
    """Open and fully decode an image (path, bytes, or a `datasets.Image(decode=False)` dict) with EXIF rotation."""
    if isinstance(value, dict):
        value = value["bytes"] if value.get("bytes") is not None else value["path"]
    if isinstance(value, bytes):
        value = io.BytesIO(value)
    with Image.open(value) as image:
        image.load()  # decode now so a truncated file fails here, not halfway through the pipeline
        return ImageOps.exif_transpose(image)  # a copy that outlives the file


def preprocess_image(image: Image.Image, resolution: int) -> np.ndarray:
    """The `(resolution, resolution, 3)` uint8 array the encoder sees for one image."""
    return np.array(center_crop_arr(to_rgb(image), resolution))


def load_latent_cache(cache_dir: str | os.PathLike) -> tuple[datasets.Dataset, dict[str, Any]]:
    """Open a finished latent cache: its rows (memory-mapped) and its metadata."""
    cache_dir = Path(cache_dir)
    info_path = cache_dir / CACHE_INFO_NAME
    if not info_path.is_file():
        unfinished = " (it holds unfinished shards: run it again to resume)" if (cache_dir / "shards").is_dir() else ""
        raise FileNotFoundError(
            f"No finished latent cache at {cache_dir}: {info_path} is missing{unfinished}. "
            f"Create it with `python precompute_latents.py --output_dir {cache_dir} ...` (see --help)."
        )
    info = json.loads(info_path.read_text())
    if info.get("format_version") != CACHE_FORMAT_VERSION:
        raise ValueError(
            f"The latent cache at {cache_dir} has format version {info.get('format_version')}, this code reads "
            f"version {CACHE_FORMAT_VERSION}; re-create it with this version of precompute_latents.py."
        )
    dataset = datasets.load_from_disk(str(cache_dir))
    if len(dataset) != info["num_rows"]:
        raise ValueError(
            f"The latent cache at {cache_dir} has {len(dataset)} rows but {CACHE_INFO_NAME} says {info['num_rows']}; "
            "it was modified after it was written. Re-create it with precompute_latents.py."
        )
    return dataset, info


def _config_value(config: Mapping | Any, key: str) -> Any:
    """Read `key` from a config mapping or from a `model.config`-like object."""
    if isinstance(config, Mapping):
        if key not in config:
            raise KeyError(f"The model config has no `{key}`; expected a DiTTransformer2DModel config.")
        return config[key]
    return getattr(config, key)


def validate_latent_cache(dataset: datasets.Dataset, info: Mapping[str, Any], model_config: Mapping | Any) -> None:
    """Raise a ValueError saying what to change if the cache cannot train a DiT with `model_config`."""
    channels, height, width = info["latent_shape"]
    kind = "pixel" if info["pixel_space"] else "latent"
    in_channels = _config_value(model_config, "in_channels")
    if in_channels != channels:
        remake = "" if info["pixel_space"] else f", or re-create the cache with a VAE of latent_channels={in_channels}"
        raise ValueError(
            f"The cache holds {channels}-channel {kind}s (shape {info['latent_shape']}) but the model has "
            f"in_channels={in_channels}. Build the model with in_channels={channels}{remake}."
        )
    sample_size = _config_value(model_config, "sample_size")
    model_hw = tuple(sample_size) if isinstance(sample_size, list | tuple) else (sample_size, sample_size)
    if model_hw != (height, width):
        raise ValueError(
            f"The cache holds {kind}s of size {height}x{width} (images at resolution {info['resolution']}) but the "
            f"model has sample_size={sample_size}. Build the model with sample_size={height}, or re-create the cache "
            f"with --resolution {model_hw[0] * info['resolution'] // height} if the model is right."
        )
    if not info["conditional"]:
        return
    num_classes = _config_value(model_config, "num_embeds_ada_norm")
    labels = np.asarray(dataset.select_columns(["label"]).to_dict()["label"], dtype=np.int64)
    bad = np.flatnonzero((labels < 0) | (labels >= (num_classes or 0)))
    if len(bad):
        row = int(bad[0])
        if 0 <= labels[row] < info["num_classes"]:
            fix = (
                f"The cache has {info['num_classes']} classes: build the model with "
                f"num_embeds_ada_norm={info['num_classes']} (or resize its label table)."
            )
        else:
            fix = (
                f"The cache's {CACHE_INFO_NAME} lists only {info['num_classes']} classes, so its rows were changed "
                "after it was written: re-create it with precompute_latents.py."
            )
        raise ValueError(
            f"Row {row} of the cache (source {dataset[row]['source']!r}) has label {labels[row]} but the model has "
            f"num_embeds_ada_norm={num_classes} classes ({len(bad)} rows are out of range). {fix}"
        )


class LatentDataset(torch.utils.data.Dataset):
    """Map-style dataset over a latent cache yielding `(latent sample (C, H, W), label ())`.

    Each access draws a fresh `mean + std * randn` (as DiT samples its latents) from one view of the row, the mirrored
    one with probability 1/2 when the cache has flips. It uses torch's global RNG, so the trainer's seeding and
    Accelerate's RNG checkpointing cover it; DataLoader workers get their own seeds from it.
    """

    def __init__(
        self,
        cache_dir: str | os.PathLike,
        model_config: Mapping | Any | None = None,
        null_label: int | None = None,
        random_flip: bool = True,
    ) -> None:
        """Open the cache at `cache_dir`, validate it against `model_config` if given.

        `null_label` is the label yielded for every row of an unconditional cache (DiT's null class index, i.e. its
        num_embeds_ada_norm); `random_flip=False` always yields the unmirrored view.
        """
        self.dataset, self.info = load_latent_cache(cache_dir)
        if model_config is not None:
            validate_latent_cache(self.dataset, self.info, model_config)
        self.conditional: bool = self.info["conditional"]
        self.class_names: list[str] | None = self.info["class_names"]
        self.num_classes: int = self.info["num_classes"]
        self.num_rows: int = self.info["num_rows"]
        self.num_views: int = self.info["num_views"]
        self.latent_shape: tuple[int, int, int] = tuple(self.info["latent_shape"])
        self.pixel_space: bool = self.info["pixel_space"]
        self.scaling_factor: float | None = self.info["scaling_factor"]
        if not self.conditional and null_label is None:
            raise ValueError(
                f"The cache at {cache_dir} is unconditional (no labels): pass null_label=<the model's null class "
                "index, i.e. its num_embeds_ada_norm> so every row gets the null class."
            )
        self.null_label = null_label
        self.random_flip = random_flip
        columns = ["mean"] + ([] if self.pixel_space else ["std"]) + (["label"] if self.conditional else [])
        self._rows = self.dataset.with_format("numpy", columns=columns)

    def __len__(self) -> int:
        return self.num_rows

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        row = self._rows[index]
        view = int(torch.randint(self.num_views, ())) if self.random_flip and self.num_views > 1 else 0
        sample = torch.tensor(row["mean"][view])  # (C, H, W); a copy, the arrow buffer is read-only
        if not self.pixel_space:
            std = torch.tensor(row["std"][view])
            sample = sample + std * torch.randn(sample.shape)
        label = int(row["label"]) if self.conditional else self.null_label
        return sample, torch.tensor(label, dtype=torch.long)
