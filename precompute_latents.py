#!/usr/bin/env python
"""Encode an image dataset once into a latent cache for DP-DiT training.

    python precompute_latents.py --train_data_dir ./photos --resolution 256 --flip --output_dir ./latents
    accelerate launch --num_processes 4 precompute_latents.py --dataset_name ./my_dataset --output_dir ./latents
    python precompute_latents.py --train_data_dir ./digits --vae none --resolution 8 --output_dir ./digits_cache

(Several processes on a machine without GPUs: `accelerate launch --multi_gpu --num_processes 4 ...` runs them on CPU;
`--cpu` would start only one.)

Each row of the cache holds one image's VAE latent distribution (mean and std, multiplied by the VAE's scaling factor)
and, with --flip, that of its mirrored copy too: under DP the unit of privacy is one row, so every augmentation of an
image must live in its row. Training draws a fresh `mean + std * randn` per step (`dp_utils.data.LatentDataset`).

The input is split into shards of --shard_size images; each shard is saved, then marked finished, so a killed run
resumes from the finished shards, and several processes (`accelerate launch`) split the shards between them. The main
process then merges the shards in order into one dataset in --output_dir (`datasets.load_from_disk`) and writes
`cache_info.json` last: a directory without it is not a finished cache. The format is described in dp_utils/data.py.

Images of any mode become 8-bit RGB: 16-bit greyscale is rescaled to 8 bits (not clipped), transparency is composited
on white, and the EXIF orientation is applied. They are then resized and centre-cropped as DiT/ADM do
(`center_crop_arr`). Unreadable images are skipped with a warning and listed in cache_info.json (--strict: an error).
"""

import argparse
import hashlib
import json
import logging
import os
import shlex
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

import datasets
import numpy as np
import torch
from accelerate import PartialState
from accelerate.logging import get_logger
from diffusers import AutoencoderKL
from PIL import Image
from tqdm.auto import tqdm

from dp_utils.data import CACHE_FORMAT_VERSION, CACHE_INFO_NAME, load_image, preprocess_image
from dp_utils.distributed import check_world_size, run_on_cpu

logger = get_logger(__name__)

DEFAULT_VAE = "stabilityai/sd-vae-ft-ema"
SHARDS_DIR = "shards"
SETTINGS_NAME = "settings.json"
IMAGE_EXTENSIONS = {ext for ext, fmt in Image.registered_extensions().items() if fmt in Image.OPEN}


def to_model_input(pixels: torch.Tensor, flip: bool) -> torch.Tensor:
    """`(B, H, W, 3)` uint8 -> `(B, V, 3, H, W)` float in [-1, 1], with the mirrored image as view 1 if `flip`."""
    x = pixels.permute(0, 3, 1, 2).float() / 127.5 - 1.0  # (B, 3, H, W)
    views = [x, x.flip(-1)] if flip else [x]
    return torch.stack(views, dim=1)  # (B, V, 3, H, W)


@torch.no_grad()
def encode_batch(vae: AutoencoderKL, x: torch.Tensor, scaling_factor: float, shift_factor: float) -> tuple:
    """Latent mean and std of `x` `(N, 3, H, W)`, mapped as training expects: `(z - shift) * scaling_factor`."""
    dist = vae.encode(x).latent_dist
    return (dist.mean - shift_factor) * scaling_factor, dist.std * scaling_factor


@dataclass
class ImageSource:
    """The input images in a fixed order: how to open each one, its name, and the labels."""

    ids: list[str]  # a row's name in messages and in the cache's `source` column
    labels: list[int] | None  # None: unconditional
    class_names: list[str] | None
    fingerprint: str  # changes with the input, so a resumed run never mixes two inputs
    paths: list[str] | None = None  # --train_data_dir
    dataset: datasets.Dataset | None = None  # --dataset_name, images left undecoded
    image_column: str = "image"

    def open(self, i: int) -> Image.Image:
        """Decode input image `i`."""
        return load_image(self.paths[i] if self.paths is not None else self.dataset[i][self.image_column])


def read_image_folder(root: str, unconditional: bool) -> ImageSource:
    """List an image folder: one sub-folder per class (labels in sorted name order), or only images (unconditional)."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"--train_data_dir {root} is not a directory.")

    def images_in(folder: Path) -> list[Path]:
        found = []
        for dirpath, dirnames, filenames in os.walk(folder):
            dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
            found += [Path(dirpath, f) for f in sorted(filenames) if Path(f).suffix.lower() in IMAGE_EXTENSIONS]
        return found

    class_dirs = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    loose = sorted(p for p in root.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)
    if class_dirs and loose:
        raise ValueError(
            f"--train_data_dir {root} has both class sub-folders ({', '.join(p.name for p in class_dirs[:5])}) and "
            f"loose images ({', '.join(p.name for p in loose[:5])}). Move the images into class folders, or use a "
            "folder of images only for unconditional data."
        )
    groups = [(d.name, images_in(d)) for d in class_dirs] or [(None, loose)]
    for name, files in groups:
        if name is not None and not files:
            raise ValueError(f"Class folder {root / name} has no images; add images or remove the folder.")
    files = [f for _, files in groups for f in files]
    if not files:
        raise ValueError(f"--train_data_dir {root} holds no images (extensions {sorted(IMAGE_EXTENSIONS)[:12]}...).")
    ids = [f.relative_to(root).as_posix() for f in files]
    conditional = bool(class_dirs) and not unconditional
    labels = [k for k, (_, files) in enumerate(groups) for _ in files] if conditional else None
    listing = "\n".join(f"{i}\t{f.stat().st_size}" for i, f in zip(ids, files, strict=True))
    return ImageSource(
        ids=ids,
        labels=labels,
        class_names=[name for name, _ in groups] if conditional else None,
        fingerprint=hashlib.sha256(listing.encode()).hexdigest(),
        paths=[str(f) for f in files],
    )


def read_dataset(args: argparse.Namespace) -> ImageSource:
    """Load `--dataset_name` (Hub id, local loadable folder, or a `save_to_disk` folder) and check its columns."""
    name = args.dataset_name
    try:
        if any(os.path.isfile(os.path.join(name, f)) for f in ("state.json", "dataset_dict.json")):
            dataset = datasets.load_from_disk(name)
        else:
            dataset = datasets.load_dataset(
                name, args.dataset_config_name, data_dir=args.data_dir, split=args.split, cache_dir=args.cache_dir
            )
    except (ValueError, IndexError) as error:  # datasets refuses empty splits; an empty save_to_disk cannot be read
        raise ValueError(f"Could not load split '{args.split}' of --dataset_name {name}: {error!r}") from error
    if isinstance(dataset, datasets.DatasetDict):
        if args.split not in dataset:
            raise ValueError(f"--split {args.split} is not in {name}; available splits: {list(dataset)}.")
        dataset = dataset[args.split]
    columns = dataset.column_names
    if args.image_column not in columns:
        raise ValueError(f"--image_column '{args.image_column}' is not in {name}; available columns: {columns}.")
    feature = dataset.features[args.image_column]
    if isinstance(feature, datasets.Image):
        dataset = dataset.cast_column(args.image_column, datasets.Image(decode=False))  # decode ourselves, per row
    elif feature != datasets.Value("string"):
        raise ValueError(f"--image_column '{args.image_column}' holds {feature}, not images or image file paths.")
    if len(dataset) == 0:
        raise ValueError(f"Split '{args.split}' of {name} is empty: nothing to encode.")
    label_column = args.label_column
    if label_column is None:
        label_column = "label" if "label" in columns else "none"
        if label_column == "none":
            logger.warning(f"{name} has no 'label' column: making an unconditional cache (columns: {columns}).")
    labels = class_names = None
    if label_column.lower() != "none":
        if label_column not in columns:
            raise ValueError(
                f"--label_column '{label_column}' is not in {name}; available columns: {columns}. "
                "Pass --label_column <name>, or --label_column none for an unconditional cache."
            )
        values = dataset.select_columns([label_column]).to_dict()[label_column]
        label_feature = dataset.features[label_column]
        if None in values:
            raise ValueError(f"Row {values.index(None)} has no label; drop such rows or pass --label_column none.")
        if isinstance(label_feature, datasets.ClassLabel):
            class_names = list(label_feature.names)
        elif all(isinstance(v, str) for v in values):
            class_names = sorted(set(values))
            index = {c: k for k, c in enumerate(class_names)}
            values = [index[v] for v in values]
        elif all(isinstance(v, int) and not isinstance(v, bool) for v in values):
            class_names = [str(k) for k in range(max(values) + 1)]
        else:
            raise ValueError(f"--label_column '{label_column}' holds {label_feature}: expected class ids or names.")
        bad = [i for i, v in enumerate(values) if not 0 <= v < len(class_names)]
        if bad:
            raise ValueError(
                f"Row {bad[0]} has label {values[bad[0]]}, outside 0..{len(class_names) - 1}; drop "
                "unlabelled rows, or pass --label_column none for an unconditional cache."
            )
        labels = values
    listing = f"{len(dataset)} rows {dataset.features}"
    return ImageSource(
        ids=[f"{args.split}[{i}]" for i in range(len(dataset))],
        labels=labels,
        class_names=class_names,
        fingerprint=hashlib.sha256(listing.encode()).hexdigest(),
        dataset=dataset,
        image_column=args.image_column,
    )


class ImageRows(torch.utils.data.Dataset):
    """Input images `start..end` preprocessed in DataLoader workers: `(i, uint8 (H, W, 3) or None, error or None)`."""

    def __init__(self, source: ImageSource, start: int, end: int, resolution: int) -> None:
        self.source, self.start, self.end, self.resolution = source, start, end, resolution

    def __len__(self) -> int:
        return self.end - self.start

    def __getitem__(self, k: int) -> tuple:
        i = self.start + k
        try:
            return i, torch.from_numpy(preprocess_image(self.source.open(i), self.resolution)), None
        except Exception as error:  # any failure to decode means the file is unusable; reported, not hidden
            return i, None, f"{type(error).__name__}: {error}"


def load_vae_config(args: argparse.Namespace) -> tuple[dict | None, dict]:
    """The VAE config (None for pixels) and how to load its weights; check the resolution fits it."""
    if args.vae is not None and args.vae.lower() == "none":
        return None, {}
    kwargs = {"pretrained_model_name_or_path": args.vae or args.pretrained_model_name_or_path or DEFAULT_VAE}
    if args.vae is None and args.pretrained_model_name_or_path is not None:
        kwargs["subfolder"] = "vae"
    elif os.path.isfile(os.path.join(kwargs["pretrained_model_name_or_path"], "model_index.json")):
        raise ValueError(f"--vae {args.vae} is a pipeline folder: pass it as --pretrained_model_name_or_path.")
    kwargs["cache_dir"] = args.cache_dir
    vae_id = kwargs["pretrained_model_name_or_path"] + ("/vae" if "subfolder" in kwargs else "")
    try:
        config = AutoencoderKL.load_config(**kwargs)
    except OSError as error:
        raise OSError(
            f"Could not load the VAE {vae_id}: {error} Pass --vae <Hub id or local folder of an "
            "AutoencoderKL>, --pretrained_model_name_or_path <DiT pipeline>, or --vae none for pixels."
        ) from error
    factor = 2 ** (len(config["block_out_channels"]) - 1)
    if args.resolution % factor:
        raise ValueError(
            f"--resolution {args.resolution} is not a multiple of the VAE's downsampling factor {factor}; use e.g. "
            f"--resolution {(args.resolution // factor + 1) * factor}."
        )
    return config, kwargs


def check_output_dir(output_dir: Path, settings: dict) -> bool:
    """True if `output_dir` already holds this finished cache; raise if it holds anything else."""
    for path in (output_dir / CACHE_INFO_NAME, output_dir / SHARDS_DIR / SETTINGS_NAME):
        if path.is_file():
            found = json.loads(path.read_text())
            found = found.get("settings") if path.name == CACHE_INFO_NAME else found
            if found != settings:
                diff = [f"{k}: {found.get(k)!r} there, {v!r} now" for k, v in settings.items() if found.get(k) != v]
                raise ValueError(
                    f"--output_dir {output_dir} holds a cache made with different settings ({'; '.join(diff)}). "
                    "Pick another --output_dir, or delete that one to rebuild it."
                )
            return path.name == CACHE_INFO_NAME
    if output_dir.is_dir() and any(output_dir.iterdir()):
        raise ValueError(f"--output_dir {output_dir} is not empty and holds no latent cache; pick an empty directory.")
    return False


def write_json(path: Path, data: dict) -> None:
    """Write JSON atomically, so a reader never sees half a file."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2))
    os.replace(tmp, path)


def cache_features(shape: tuple, pixel_space: bool, class_names: list[str] | None) -> datasets.Features:
    """Column types of the cache; `shape` is `(V, C, H, W)`."""
    features = {"mean": datasets.Array4D(shape, "float32")}
    if not pixel_space:
        features["std"] = datasets.Array4D(shape, "float32")
    if class_names is not None:
        features["label"] = datasets.ClassLabel(names=class_names)
    features["source"] = datasets.Value("string")
    return datasets.Features(features)


def encode_shard(
    source: ImageSource,
    start: int,
    end: int,
    args: argparse.Namespace,
    vae: AutoencoderKL | None,
    latent_shape: list[int],
    progress: tqdm,
) -> tuple[dict[str, list], list[dict]]:
    """Encode input images `start..end`: the cache columns of the readable ones, and what was skipped and why."""
    num_views = 2 if args.flip else 1
    loader = torch.utils.data.DataLoader(
        ImageRows(source, start, end, args.resolution),
        batch_size=args.batch_size,
        num_workers=args.dataloader_num_workers,
        collate_fn=list,
    )
    rows = {"mean": [], "std": [], "label": [], "source": []}
    skipped = []
    for batch in loader:
        for i, _, error in batch:
            if error is None:
                continue
            if args.strict:
                raise ValueError(
                    f"Cannot read image {source.ids[i]}: {error}. Fix or remove it, or run without "
                    "--strict to skip unreadable images."
                )
            logger.warning(f"Skipping unreadable image {source.ids[i]}: {error}", main_process_only=False)
            skipped.append({"source": source.ids[i], "error": error})
        good = [(i, pixels) for i, pixels, error in batch if error is None]
        progress.update(len(batch))
        if not good:
            continue
        x = to_model_input(torch.stack([p for _, p in good]), args.flip)  # (B, V, 3, H, W)
        if vae is None:
            mean, std = x, None
        else:
            flat = x.flatten(0, 1).to(vae.device, dtype=vae.dtype)  # (B * V, 3, H, W)
            mean, std = encode_batch(vae, flat, vae.config.scaling_factor, vae.config.get("shift_factor") or 0.0)
            rows["std"].append(std.float().cpu().reshape(len(good), num_views, *latent_shape).numpy())
        rows["mean"].append(mean.float().cpu().reshape(len(good), num_views, *latent_shape).numpy())
        if source.labels is not None:
            rows["label"] += [source.labels[i] for i, _ in good]
        rows["source"] += [source.ids[i] for i, _ in good]
    return rows, skipped


def save_shard(shards_dir: Path, k: int, rows: dict[str, list], skipped: list[dict], features: datasets.Features):
    """Save shard `k` under a temporary name, move it into place, then mark it done: only a marked shard counts."""
    shard_path, tmp_path = shards_dir / f"{k:05d}", shards_dir / f"{k:05d}.tmp"
    for stale in (shard_path, tmp_path):
        shutil.rmtree(stale, ignore_errors=True)
    if rows["source"]:  # an all-skipped shard has no rows, and datasets cannot reload an empty save
        columns = {name: np.concatenate(rows[name]) if name in ("mean", "std") else rows[name] for name in features}
        datasets.Dataset.from_dict(columns, features=features).save_to_disk(str(tmp_path))
        os.replace(tmp_path, shard_path)
    write_json(shards_dir / f"{k:05d}.done.json", {"rows": len(rows["source"]), "skipped": skipped})


def merge_shards(output_dir: Path, num_shards: int) -> tuple[datasets.Dataset, list[dict]]:
    """Concatenate the finished shards in order into the dataset in `output_dir`; also return all skipped images."""
    shards_dir = output_dir / SHARDS_DIR
    parts, skipped = [], []
    for k in range(num_shards):
        marker = json.loads((shards_dir / f"{k:05d}.done.json").read_text())
        skipped += marker["skipped"]
        if marker["rows"]:
            parts.append(datasets.load_from_disk(str(shards_dir / f"{k:05d}")))
    if not parts:
        raise ValueError(f"None of the input images could be read, e.g. {skipped[0]}.")
    merged = datasets.concatenate_datasets(parts)
    for stale in [*output_dir.glob("data-*.arrow"), output_dir / "state.json", output_dir / "dataset_info.json"]:
        stale.unlink(missing_ok=True)  # left by a merge that was killed
    merged.save_to_disk(str(output_dir))
    return merged, skipped


def make_state() -> PartialState:
    """Accelerate's process state; several processes without a GPU share the work on CPU (gloo)."""
    state = PartialState(cpu=run_on_cpu())
    check_world_size(state.num_processes)
    return state


def parse_args(input_args: list[str] | None = None) -> argparse.Namespace:
    """Parse the command line."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    data = parser.add_argument_group("input (give --dataset_name or --train_data_dir)")
    data.add_argument(
        "--dataset_name",
        type=str,
        default=None,
        help="A Hub dataset id, a local folder loadable by `datasets.load_dataset` (e.g. 'imagefolder' "
        "with --data_dir), or a folder written by `Dataset.save_to_disk`.",
    )
    data.add_argument("--dataset_config_name", type=str, default=None, help="The dataset's config, if it has several.")
    data.add_argument("--data_dir", type=str, default=None, help="`data_dir` for `datasets.load_dataset`.")
    data.add_argument("--split", type=str, default="train", help="The split to encode (default: %(default)s).")
    data.add_argument(
        "--image_column",
        type=str,
        default="image",
        help="Column of images (or image file paths) in --dataset_name (default: %(default)s).",
    )
    data.add_argument(
        "--label_column",
        type=str,
        default=None,
        help="Column of class ids or names. Default: 'label' if the dataset has one, else an "
        "unconditional cache. 'none': ignore labels (unconditional), also for --train_data_dir.",
    )
    data.add_argument(
        "--train_data_dir",
        type=str,
        default=None,
        help="A folder with one sub-folder of images per class (labels from the sorted folder names), "
        "or a folder of images only (unconditional).",
    )
    model = parser.add_argument_group("encoding")
    model.add_argument(
        "--vae",
        type=str,
        default=None,
        help=f"Hub id or local path of an AutoencoderKL (default {DEFAULT_VAE}), or 'none' to store "
        "pixels scaled to [-1, 1] for pixel-space training.",
    )
    model.add_argument(
        "--pretrained_model_name_or_path",
        type=str,
        default=None,
        help="A DiT pipeline (Hub id or folder) whose vae/ subfolder is used instead of --vae.",
    )
    model.add_argument(
        "--resolution",
        type=int,
        default=256,
        help="Images are resized and centre-cropped to this square size (a multiple of the VAE's "
        "downsampling factor; the default %(default)s gives 32x32 latents with the SD VAE).",
    )
    model.add_argument(
        "--flip",
        action="store_true",
        help="Also encode the mirrored image, into the same row (so augmentation stays in the row).",
    )
    model.add_argument(
        "--mixed_precision",
        type=str,
        default=None,
        choices=["no", "fp16", "bf16"],
        help="Precision of the VAE. Default: accelerate's setting, else 'no' (fp32). The cache is stored in fp32.",
    )
    model.add_argument(
        "--batch_size", type=int, default=32, help="Images per VAE forward pass, per process (default: %(default)s)."
    )
    model.add_argument(
        "--dataloader_num_workers",
        type=int,
        default=0,
        help="Worker processes that decode and resize images (0: in the main process).",
    )
    out = parser.add_argument_group("output")
    out.add_argument(
        "--output_dir",
        type=str,
        required=True,
        help=f"Where the cache goes: the dataset (`datasets.load_from_disk`) and {CACHE_INFO_NAME}. "
        "Re-running with the same settings resumes an unfinished cache.",
    )
    out.add_argument("--cache_dir", type=str, default=None, help="Where downloaded datasets and models are cached.")
    out.add_argument(
        "--shard_size",
        type=int,
        default=1000,
        help="Input images per shard: the unit that is saved, resumed, and split between processes "
        "(default: %(default)s).",
    )
    out.add_argument(
        "--strict",
        action="store_true",
        help="Stop on an unreadable image instead of skipping it (skips are listed in the metadata).",
    )
    args = parser.parse_args(input_args)
    args.argv = list(sys.argv[1:] if input_args is None else input_args)
    if (args.dataset_name is None) == (args.train_data_dir is None):
        raise ValueError("Give exactly one of --dataset_name or --train_data_dir.")
    if args.vae is not None and args.pretrained_model_name_or_path is not None:
        raise ValueError("Give --vae or --pretrained_model_name_or_path (whose vae/ is used), not both.")
    if args.train_data_dir is not None and args.label_column not in (None, "none"):
        raise ValueError("--label_column is for --dataset_name; --train_data_dir takes labels from its sub-folders.")
    for flag in ("resolution", "batch_size", "shard_size"):
        if getattr(args, flag) < 1:
            raise ValueError(f"--{flag} must be positive, got {getattr(args, flag)}.")
    if args.mixed_precision is None:
        args.mixed_precision = os.environ.get("ACCELERATE_MIXED_PRECISION", "no")
    return args


def main(args: argparse.Namespace) -> None:
    """Validate everything, encode this process's unfinished shards, then merge them on the main process."""
    state = make_state()
    # force: an imported library may already have configured the root logger, which would hide our INFO lines.
    logging.basicConfig(format="%(asctime)s - %(levelname)s - %(name)s - %(message)s", level=logging.INFO, force=True)
    datasets.disable_progress_bars()  # one bar of our own instead of one per shard save

    # Everything that can be wrong with the inputs is checked here, before any encoding.
    unconditional = args.label_column is not None and args.label_column.lower() == "none"
    if args.train_data_dir is not None:
        source = read_image_folder(args.train_data_dir, unconditional)
    else:
        source = read_dataset(args)
    if source.class_names is None:
        logger.info(f"{len(source.ids)} images, no labels: making an unconditional cache.")
    else:
        names = ", ".join(source.class_names[:10]) + (", ..." if len(source.class_names) > 10 else "")
        logger.info(f"{len(source.ids)} images in {len(source.class_names)} classes: {names}.")
    vae_config, vae_kwargs = load_vae_config(args)
    pixel_space = vae_config is None
    factor = 1 if pixel_space else 2 ** (len(vae_config["block_out_channels"]) - 1)
    channels = 3 if pixel_space else vae_config["latent_channels"]
    latent_shape = [channels, args.resolution // factor, args.resolution // factor]
    num_views = 2 if args.flip else 1
    vae_id = vae_kwargs.get("pretrained_model_name_or_path")
    settings = {
        "format_version": CACHE_FORMAT_VERSION,
        "input": os.path.abspath(args.train_data_dir) if args.train_data_dir else args.dataset_name,
        "dataset_config_name": args.dataset_config_name,
        "data_dir": args.data_dir,
        "split": None if args.train_data_dir else args.split,
        "image_column": None if args.train_data_dir else args.image_column,
        "conditional": source.labels is not None,
        "input_fingerprint": source.fingerprint,
        "num_inputs": len(source.ids),
        "vae": os.path.abspath(vae_id) if vae_id and os.path.isdir(vae_id) else vae_id,
        "vae_subfolder": vae_kwargs.get("subfolder"),
        "resolution": args.resolution,
        "flip": args.flip,
        "mixed_precision": "no" if pixel_space else args.mixed_precision,
        "shard_size": args.shard_size,
    }
    output_dir = Path(args.output_dir)
    shards_dir = output_dir / SHARDS_DIR
    if check_output_dir(output_dir, settings):
        logger.info(f"{output_dir} already holds this finished cache; nothing to do.")
        return
    state.wait_for_everyone()  # every process has checked the old settings before the main one writes them
    if state.is_main_process:
        shards_dir.mkdir(parents=True, exist_ok=True)
        write_json(shards_dir / SETTINGS_NAME, settings)
    state.wait_for_everyone()

    vae = None
    if not pixel_space:
        dtype = {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[args.mixed_precision]
        vae = AutoencoderKL.from_pretrained(**vae_kwargs, torch_dtype=dtype).to(state.device).requires_grad_(False)
    features = cache_features((num_views, *latent_shape), pixel_space, source.class_names)

    num_shards = -(-len(source.ids) // args.shard_size)
    mine = [k for k in range(state.process_index, num_shards, state.num_processes)]
    todo = [k for k in mine if not (shards_dir / f"{k:05d}.done.json").is_file()]
    bounds = {k: (k * args.shard_size, min((k + 1) * args.shard_size, len(source.ids))) for k in todo}
    logger.info(
        f"{len(source.ids)} images in {num_shards} shards. Process {state.process_index} of "
        f"{state.num_processes}: shards {mine}, {len(mine) - len(todo)} done before.",
        main_process_only=False,
    )
    progress = tqdm(
        total=sum(e - s for s, e in bounds.values()), desc="Encoding", disable=not state.is_local_main_process
    )
    for k in todo:
        rows, skipped = encode_shard(source, *bounds[k], args, vae, latent_shape, progress)
        save_shard(shards_dir, k, rows, skipped, features)
    progress.close()
    state.wait_for_everyone()

    if state.is_main_process:
        merged, skipped = merge_shards(output_dir, num_shards)
        info = {
            "format_version": CACHE_FORMAT_VERSION,
            "num_rows": len(merged),
            "latent_shape": latent_shape,
            "channels": channels,
            "num_views": num_views,
            "flip": args.flip,
            "resolution": args.resolution,
            "pixel_space": pixel_space,
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
        }
        write_json(output_dir / CACHE_INFO_NAME, info)  # last: its presence means the cache is finished
        shutil.rmtree(shards_dir)
        logger.info(f"Wrote {len(merged)} rows to {output_dir}; skipped {len(skipped)} unreadable images.")
    state.wait_for_everyone()


if __name__ == "__main__":
    main(parse_args())
