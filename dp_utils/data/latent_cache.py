"""The latent cache of `precompute_latents.py`: its format, writing and opening it, checking it against a DiT config.

A cache directory holds a `datasets` dataset (`datasets.load_from_disk(cache_dir)`) with one row per image:

- `mean`: float32 `(V, C, H, W)`, the VAE latent mean already multiplied by the scaling factor (pixels in [-1, 1]
  when the cache was made with `--vae none`); `V` is 2 when the mirrored image was encoded too, else 1.
- `std`: float32 `(V, C, H, W)`, the latent std times the scaling factor (absent for pixel caches).
- `label`: int64 `ClassLabel` (absent for unconditional caches). A class that had images but none readable is
  refused when the cache is written; a `ClassLabel` input keeps its classes without images (e.g. an ImageNet subset).
- `source`: string, the image file (relative to the image folder) or the dataset row (`train[12]`) it came from.
- `prompt_embeds`, `pooled_prompt_embeds`: a text-to-image cache's caption encodings (`dp_utils.data.captions`).

and `cache_info.json`, written last, with the metadata (see `precompute_latents.py`), among it the fingerprint of
the input's content (`dp_utils.data.images`). Every view of an image lives in that image's row, so one row is one
unit of privacy.

While unfinished, the directory holds `shards/settings.json` and, for each finished shard, `shards/NNNNN/` (its rows;
absent if none could be read) and `shards/NNNNN.done.json` (row count, skipped images, and the fingerprint of the
bytes it encoded).
"""

import json
import os
import shlex
import shutil
from collections import Counter
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import datasets
import numpy as np
import torch

from ..errors import UserError, check_writable_dir, one_line
from .images import IMAGE_EXTENSIONS, ImageSource

CACHE_INFO_NAME = "cache_info.json"
CACHE_FORMAT_VERSION = 1
SHARDS_DIR = "shards"  # an unfinished cache: one saved dataset and one done marker per shard
SETTINGS_NAME = "settings.json"
EMPTY_PROMPT_NAME = "empty_prompt.safetensors"  # a text-to-image cache's encoding of "" (`dp_utils.data.captions`)


class CacheNotFoundError(UserError, FileNotFoundError):
    """There is no finished latent cache where one was expected."""


def cache_features(shape: tuple, pixel_space: bool, class_names: list[str] | None) -> datasets.Features:
    """Column types of the cache; `shape` is `(V, C, H, W)`."""
    features = {"mean": datasets.Array4D(shape, "float32")}
    if not pixel_space:
        features["std"] = datasets.Array4D(shape, "float32")
    if class_names is not None:
        features["label"] = datasets.ClassLabel(names=class_names)
    features["source"] = datasets.Value("string")
    return datasets.Features(features)


# What reading a missing, truncated or edited file raises: json (ValueError), pyarrow (OSError, ArrowInvalid is a
# ValueError), datasets (FileNotFoundError, ValueError), a metadata file without an expected key (KeyError, TypeError).
DAMAGED = (OSError, ValueError, KeyError, TypeError)
INFO_KEYS = ("num_rows", "latent_shape", "num_views", "pixel_space", "conditional", "num_classes", "class_names")


def read_json(path: Path) -> dict:
    """A JSON object from `path`; a file that is not one raises ValueError."""
    data = json.loads(path.read_text())
    if not isinstance(data, dict):
        raise ValueError(f"{path.name} holds {type(data).__name__}, not a JSON object")
    return data


def load_latent_cache(cache_dir: str | os.PathLike) -> tuple[datasets.Dataset, dict[str, Any]]:
    """Open a finished latent cache: its rows (memory-mapped) and its metadata; a damaged cache is a UserError."""
    cache_dir = Path(cache_dir)
    info_path = cache_dir / CACHE_INFO_NAME
    if not info_path.is_file():
        if holds_images(cache_dir):
            raise CacheNotFoundError(
                f"{cache_dir} is an image folder, not a latent cache. Encode it first: `python precompute_latents.py "
                f"--train_data_dir {cache_dir} --output_dir <a new folder> ...` (see --help), then train on that "
                "folder."
            )
        unfinished = (
            " (it holds unfinished shards: run it again to resume)" if (cache_dir / SHARDS_DIR).is_dir() else ""
        )
        raise CacheNotFoundError(
            f"No finished latent cache at {cache_dir}: {info_path} is missing{unfinished}. "
            f"Create it with `python precompute_latents.py --output_dir {cache_dir} ...` (see --help)."
        )
    try:
        info = read_json(info_path)
        if info.get("format_version") != CACHE_FORMAT_VERSION:
            raise UserError(
                f"The latent cache at {cache_dir} has format version {info.get('format_version')}, this code reads "
                f"version {CACHE_FORMAT_VERSION}; re-create it with this version of precompute_latents.py."
            )
        missing = [key for key in INFO_KEYS if key not in info]
        if missing:
            raise KeyError(f"{CACHE_INFO_NAME} lacks {', '.join(missing)}")
        dataset = datasets.load_from_disk(str(cache_dir))
        columns = ["mean"] + ([] if info["pixel_space"] else ["std"]) + (["label"] if info["conditional"] else [])
        absent = [c for c in columns if c not in dataset.column_names]
        if absent:
            raise KeyError(f"the rows lack the column(s) {', '.join(absent)}")
    except UserError:
        raise
    except DAMAGED as error:
        raise UserError(
            f"The latent cache at {cache_dir} is damaged ({one_line(error)}). Re-create it: run precompute_latents.py "
            f"again with --output_dir {cache_dir} --overwrite_output_dir."
        ) from None
    if len(dataset) != info["num_rows"]:
        raise UserError(
            f"The latent cache at {cache_dir} has {len(dataset)} rows but {CACHE_INFO_NAME} says {info['num_rows']}; "
            "it was modified after it was written. Re-create it with precompute_latents.py."
        )
    return dataset, info


def holds_images(folder: Path) -> bool:
    """Whether `folder` or one of its sub-folders (a class folder) holds image files."""
    if not folder.is_dir():
        return False
    candidates = [*folder.iterdir(), *(p for d in folder.iterdir() if d.is_dir() for p in d.iterdir())]
    return any(p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS for p in candidates)


def read_output_dir(output_dir: Path) -> tuple[dict | None, bool]:
    """What `output_dir` holds: a cache's info (`{"settings": ...}` only if unfinished) or None, and if finished.

    A cache whose metadata cannot be read comes back as `{"settings": None, "damaged": why}`. Raise if the folder
    cannot be written or holds something that is not a latent cache.
    """
    check_writable_dir("--output_dir", output_dir)
    if (output_dir / CACHE_INFO_NAME).is_file():
        try:
            return read_json(output_dir / CACHE_INFO_NAME), True
        except DAMAGED as error:
            return {"settings": None, "damaged": one_line(error)}, True
    if (output_dir / SHARDS_DIR / SETTINGS_NAME).is_file():
        try:
            return {"settings": read_json(output_dir / SHARDS_DIR / SETTINGS_NAME)}, False
        except DAMAGED as error:
            return {"settings": None, "damaged": one_line(error)}, False
    if output_dir.is_dir() and any(output_dir.iterdir()):
        raise UserError(f"--output_dir {output_dir} is not empty and holds no latent cache; pick an empty directory.")
    return None, False


def dataset_files(output_dir: Path) -> list[Path]:
    """The files `save_to_disk` writes for the merged dataset."""
    files = ["state.json", "dataset_info.json", EMPTY_PROMPT_NAME]
    return [*output_dir.glob("data-*.arrow"), *(output_dir / name for name in files)]


def remove_cache(output_dir: Path) -> None:
    """Delete the cache in `output_dir`, its info first: a half-deleted cache never looks finished."""
    (output_dir / CACHE_INFO_NAME).unlink(missing_ok=True)
    for path in dataset_files(output_dir):
        path.unlink(missing_ok=True)
    shutil.rmtree(output_dir / SHARDS_DIR, ignore_errors=True)


def write_json(path: Path, data: dict) -> None:
    """Write JSON atomically, so a reader never sees half a file."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2))
    os.replace(tmp, path)


def shard_marker(shards_dir: Path, k: int) -> Path:
    """The file whose presence marks shard `k` finished: its row count, skipped images and content fingerprint."""
    return shards_dir / f"{k:05d}.done.json"


def finished_shard(shards_dir: Path, k: int) -> dict | None:
    """Shard `k`'s marker if the shard is finished and its rows can be read; None if it must be encoded (again)."""
    try:
        marker = read_json(shard_marker(shards_dir, k))
        if not {"rows", "skipped", "fingerprint"} <= marker.keys():
            return None
        if marker["rows"]:
            rows = datasets.load_from_disk(str(shards_dir / f"{k:05d}"))
            if len(rows) != marker["rows"]:
                raise ValueError(f"{len(rows)} rows, the marker says {marker['rows']}")
    except DAMAGED:
        return None
    return marker


def read_markers(shards_dir: Path, num_shards: int) -> list[dict]:
    """Every shard's marker, once all are encoded; a shard removed or damaged since is a UserError."""
    markers = [finished_shard(shards_dir, k) for k in range(num_shards)]
    missing = [k for k, marker in enumerate(markers) if marker is None]
    if missing:
        raise UserError(
            f"Shards {missing} in {shards_dir} were removed or damaged while this run encoded; run the same "
            "command again to encode them again."
        )
    return markers


def save_shard(
    shards_dir: Path, k: int, rows: dict[str, list], skipped: list[dict], fingerprint: str, features: datasets.Features
) -> None:
    """Save shard `k` under a temporary name, move it into place, then mark it done: only a marked shard counts."""
    shard_path, tmp_path = shards_dir / f"{k:05d}", shards_dir / f"{k:05d}.tmp"
    for stale in (shard_path, tmp_path):
        shutil.rmtree(stale, ignore_errors=True)
    if rows["source"]:  # an all-skipped shard has no rows, and datasets cannot reload an empty save
        columns = {name: np.concatenate(rows[name]) if name in ("mean", "std") else rows[name] for name in features}
        datasets.Dataset.from_dict(columns, features=features).save_to_disk(str(tmp_path))
        os.replace(tmp_path, shard_path)
    marker = {"rows": len(rows["source"]), "skipped": skipped, "fingerprint": fingerprint}
    write_json(shard_marker(shards_dir, k), marker)


def merge_shards(output_dir: Path, markers: list[dict]) -> datasets.Dataset:
    """Concatenate the finished shards in order into the dataset in `output_dir`."""
    shards_dir = output_dir / SHARDS_DIR
    parts = [datasets.load_from_disk(str(shards_dir / f"{k:05d}")) for k, m in enumerate(markers) if m["rows"]]
    merged = datasets.concatenate_datasets(parts)
    for stale in dataset_files(output_dir):
        stale.unlink(missing_ok=True)  # left by a merge that was killed
    merged.save_to_disk(str(output_dir))
    return merged


def settings_diff(found: dict, settings: dict) -> str:
    """`key: old there, new now` for every setting that differs."""
    keys = [*settings, *(k for k in found if k not in settings)]
    return "; ".join(
        f"{k}: {found.get(k)!r} there, {settings.get(k)!r} now" for k in keys if found.get(k) != settings.get(k)
    )


def describe_change(found: dict, source: ImageSource, bounds: list[tuple], fingerprints: list[str]) -> str:
    """What differs between the input of a finished cache (its info) and this input."""
    if "input_fingerprint" not in found:
        return "the cache was made before caches recorded their input's content, so it cannot be checked"
    if found.get("num_inputs") != len(source.ids):
        return f"{found.get('num_inputs')} images there, {len(source.ids)} now"
    old = found.get("shard_fingerprints") or []
    changed = [k for k, fp in enumerate(fingerprints) if k >= len(old) or old[k] != fp]
    if not changed:
        return "the class names changed"
    start, end = bounds[changed[0]]
    return (
        f"the images, names or labels changed in {len(changed)} of {len(bounds)} shards of --shard_size images, "
        f"the first among {source.ids[start]} .. {source.ids[end - 1]}"
    )


def check_shards(source: ImageSource, markers: list[dict], bounds: list[tuple], fingerprints: list[str]) -> list[dict]:
    """All skipped images of the finished shards; raise if a shard's images changed while it was encoded, or if no
    image, or no image of some class, could be read."""
    for k, marker in enumerate(markers):
        if marker["fingerprint"] != fingerprints[k]:
            start, end = bounds[k]
            raise UserError(
                f"Images among {source.ids[start]} .. {source.ids[end - 1]} changed while they were being encoded; "
                "run the same command again to encode them again."
            )
    skipped = [s for marker in markers for s in marker["skipped"]]
    if not any(marker["rows"] for marker in markers):
        raise UserError(
            f"None of the {len(source.ids)} input images could be read, e.g. {skipped[0]['source']}: "
            f"{skipped[0]['error']}"
        )
    if source.labels is None or not skipped:
        return skipped
    position = {name: i for i, name in enumerate(source.ids)}

    def label_of(skip: dict) -> int:
        return source.labels[position[skip["source"]]]

    total, unreadable = Counter(source.labels), Counter(map(label_of, skipped))
    empty = [y for y, n in sorted(unreadable.items()) if n == total[y]]
    if empty:
        example = next(s for s in skipped if label_of(s) == empty[0])
        names = ", ".join(repr(source.class_names[y]) for y in empty)
        fix = "remove its folder" if source.paths is not None else "drop its rows"
        raise UserError(
            f"Class {names} has no readable image (e.g. {example['source']}: {example['error']}), so it would have "
            f"no rows. Fix or convert its images, or {fix}, then run the same command again: only the shards that "
            "changed are encoded again."
        )
    return skipped


def _config_value(config: Mapping | Any, key: str) -> Any:
    """Read `key` from a config mapping or from a `model.config`-like object."""
    if isinstance(config, Mapping):
        if key not in config:
            raise KeyError(f"The model config has no `{key}`; expected a DiTTransformer2DModel config.")
        return config[key]
    return getattr(config, key)


def validate_latent_cache(dataset: datasets.Dataset, info: Mapping[str, Any], model_config: Mapping | Any) -> None:
    """Raise a UserError saying what to change if the cache cannot train a DiT with `model_config`."""
    channels, height, width = info["latent_shape"]
    kind = "pixel" if info["pixel_space"] else "latent"
    in_channels = _config_value(model_config, "in_channels")
    if in_channels != channels:
        remake = "" if info["pixel_space"] else f", or re-create the cache with a VAE of latent_channels={in_channels}"
        raise UserError(
            f"The cache holds {channels}-channel {kind}s (shape {info['latent_shape']}) but the model has "
            f"in_channels={in_channels}. Build the model with in_channels={channels}{remake}."
        )
    sample_size = _config_value(model_config, "sample_size")
    model_hw = tuple(sample_size) if isinstance(sample_size, list | tuple) else (sample_size, sample_size)
    if model_hw != (height, width):
        raise UserError(
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
        raise UserError(
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

    def select_random_rows(self, num_rows: int, seed: int) -> None:
        """Keep `num_rows` rows drawn at random (seeded), as diffusers' --max_train_samples keeps a shuffled subset."""
        order = torch.randperm(self.num_rows, generator=torch.Generator().manual_seed(seed))
        rows = order[:num_rows].sort().values.tolist()  # cache order: sequential reads
        self.dataset, self._rows = self.dataset.select(rows), self._rows.select(rows)
        self.num_rows = len(rows)

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


def cache_info(args, plan, features, vae, num_rows: int, skipped: list) -> dict:
    """cache_info.json: the metadata the trainer reads, and what made the cache (precompute_latents.py's flags
    `args` and `CachePlan`, its `vae` or None in pixel space)."""
    source, settings = plan.source, plan.settings
    return {
        "format_version": CACHE_FORMAT_VERSION,
        "num_rows": num_rows,
        "latent_shape": plan.latent_shape,
        "channels": plan.latent_shape[0],
        "num_views": 2 if args.random_flip else 1,
        "flip": args.random_flip,
        "resolution": args.resolution,
        "pixel_space": vae is None,
        "vae": settings["vae"],
        "vae_subfolder": settings["vae_subfolder"],
        "scaling_factor": None if vae is None else vae.config.scaling_factor,
        "shift_factor": None if vae is None else vae.config.get("shift_factor"),
        "mixed_precision": settings["mixed_precision"],
        "conditional": source.labels is not None,
        "num_classes": len(source.class_names) if source.class_names else 0,
        "class_names": source.class_names,
        "class_to_index": {c: k for k, c in enumerate(source.class_names)} if source.class_names else None,
        "columns": {name: str(feature) for name, feature in features.items()},
        "num_skipped": len(skipped),
        "skipped": skipped,
        "command": shlex.join(["python", "precompute_latents.py", *args.argv]),
        "settings": settings,
        "num_inputs": len(source.ids),
        "input_fingerprint": plan.input_fingerprint,
        "shard_fingerprints": plan.fingerprints,
    }
