#!/usr/bin/env python
"""Encode an image dataset once into a latent cache for DP-DiT training.

    python precompute_latents.py --train_data_dir ./photos --resolution 256 --random_flip --output_dir ./latents
    accelerate launch --num_processes 4 precompute_latents.py --dataset_name ./my_dataset --output_dir ./latents
    python precompute_latents.py --train_data_dir ./digits --vae none --resolution 8 --output_dir ./digits_cache

(Several processes on a machine without GPUs: `accelerate launch --multi_gpu --num_processes 4 ...` runs them on CPU;
`--cpu` would start only one.)

Each row of the cache holds one image's VAE latent distribution (mean and std, multiplied by the VAE's scaling factor)
and, with --random_flip, that of its mirrored copy too: under DP the unit of privacy is one row, so every
augmentation of an image must live in its row. Training draws a fresh `mean + std * randn` per step
(`dp_utils.data.latent_cache.LatentDataset`).

The input is split into shards of --shard_size images; each shard is saved, then marked finished, so a killed run
resumes from the finished shards, and several processes (`accelerate launch`) split the shards between them. The main
process then merges the shards in order into one dataset in --output_dir (`datasets.load_from_disk`) and writes
`cache_info.json` last: a directory without it is not a finished cache. The format is described in
dp_utils/data/latent_cache.py.

Every run first fingerprints the input by content: the SHA-256 of each image's bytes, with its name and label (the
bytes are read, not decoded). Running the same command again:
- on a finished cache of the same input does nothing; if the images, their names or labels changed, it stops and
  says which, unless --overwrite_output_dir is given (then the cache is encoded again from scratch);
- on an unfinished cache resumes it: finished shards whose images changed since are encoded again, so the cache
  never mixes old and new images;
- with other settings (resolution, VAE, ...) stops, unless --overwrite_output_dir is given.

With --caption_column, each row also holds its caption's encoding by the frozen text encoders of a PixArt-alpha/Sigma
or SD3 pipeline (dp_utils/data/captions.py, docs/text_to_image.md).

Images of any mode become 8-bit RGB by the rules of dp_utils/data/images.py (16-bit by the type's range, 32-bit and
float by a standard range that holds them or their own, transparency on white, EXIF orientation applied), then are
resized and centre-cropped as DiT/ADM do. Unreadable images are skipped with a warning and listed in cache_info.json
(--strict: an error); a class whose images are all unreadable stops the run, naming it, so the classes match the rows.

Mistakes in the flags or inputs stop the script before anything is written, with `error: <what and how to fix it>`
and exit code 2.
"""

import argparse
import hashlib
import json
import logging
import os
import shlex
import shutil
import sys
from pathlib import Path
from typing import NoReturn

import datasets
import torch
from accelerate import PartialState
from accelerate.logging import get_logger
from accelerate.utils import gather_object
from diffusers import AutoencoderKL
from tqdm.auto import tqdm

from dp_utils.data.captions import EMPTY_PROMPT_NAME, caption_encoders, read_captions
from dp_utils.data.images import (
    ImageSource,
    content_digest,
    load_image,
    preprocess_image,
    read_dataset,
    read_image_folder,
)
from dp_utils.data.latent_cache import (
    CACHE_FORMAT_VERSION,
    CACHE_INFO_NAME,
    SETTINGS_NAME,
    SHARDS_DIR,
    cache_features,
    check_shards,
    describe_change,
    merge_shards,
    read_output_dir,
    remove_cache,
    save_shard,
    settings_diff,
    shard_marker,
    write_json,
)
from dp_utils.errors import UserError, run_script
from dp_utils.training.distributed import check_world_size, run_on_cpu

logger = get_logger(__name__)

DEFAULT_VAE = "stabilityai/sd-vae-ft-ema"


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


class ImageRows(torch.utils.data.Dataset):
    """Input images `start..end` read and preprocessed in DataLoader workers.

    Each item is `(i, uint8 (H, W, 3) or None, error or None, content digest)`: the digest is of the very bytes that
    were decoded, so a shard's recorded fingerprint is that of what it holds.
    """

    def __init__(self, source: ImageSource, start: int, end: int, resolution: int) -> None:
        self.source, self.start, self.end, self.resolution = source, start, end, resolution

    def __len__(self) -> int:
        return self.end - self.start

    def __getitem__(self, k: int) -> tuple:
        i, data = self.start + k, None
        try:
            data = self.source.read_bytes(i)
            pixels = torch.from_numpy(preprocess_image(load_image(data), self.resolution))
        except Exception as error:  # any failure to read or decode makes the file unusable; reported, not hidden
            return i, None, f"{type(error).__name__}: {error}", content_digest(error if data is None else data)
        return i, pixels, None, content_digest(data)


def read_input(args: argparse.Namespace) -> ImageSource:
    """The image folder or dataset to encode, with its labels; say what was found."""
    unconditional = args.label_column is not None and args.label_column.lower() == "none"
    if args.train_data_dir is not None:
        source = read_image_folder(args.train_data_dir, unconditional)
    else:
        source = read_dataset(
            args.dataset_name,
            args.split,
            args.image_column,
            args.label_column,
            args.dataset_config_name,
            args.data_dir,
            args.cache_dir,
        )
    if args.caption_column is not None:
        return read_captions(source, args)
    if source.class_names is None:
        no_label = args.dataset_name is not None and args.label_column is None
        (logger.warning if no_label else logger.info)(
            f"{len(source.ids)} images, no labels: making an unconditional cache"
            + (" (the dataset has no 'label' column; pass --label_column <name> for labels)." if no_label else ".")
        )
    else:
        names = ", ".join(source.class_names[:10]) + (", ..." if len(source.class_names) > 10 else "")
        logger.info(f"{len(source.ids)} images in {len(source.class_names)} classes: {names}.")
    return source


def load_vae_config(args: argparse.Namespace) -> tuple[dict | None, dict]:
    """The VAE config (None for pixels) and how to load its weights; check the resolution fits it."""
    if args.vae is not None and args.vae.lower() == "none":
        return None, {}
    kwargs = {"pretrained_model_name_or_path": args.vae or args.pretrained_model_name_or_path or DEFAULT_VAE}
    if args.vae is None and args.pretrained_model_name_or_path is not None:
        kwargs["subfolder"] = "vae"
    elif os.path.isfile(os.path.join(kwargs["pretrained_model_name_or_path"], "model_index.json")):
        raise UserError(f"--vae {args.vae} is a pipeline folder: pass it as --pretrained_model_name_or_path.")
    kwargs["cache_dir"] = args.cache_dir
    vae_id = kwargs["pretrained_model_name_or_path"] + ("/vae" if "subfolder" in kwargs else "")
    try:
        config = AutoencoderKL.load_config(**kwargs)
    except OSError as error:
        reason = " ".join(str(error).split())  # diffusers' message spans lines
        raise UserError(
            f"Could not load the VAE {vae_id}: {reason} Pass --vae <Hub id or local folder of an "
            "AutoencoderKL>, --pretrained_model_name_or_path <DiT pipeline>, or --vae none for pixels."
        ) from error
    factor = 2 ** (len(config["block_out_channels"]) - 1)
    if args.resolution % factor:
        raise UserError(
            f"--resolution {args.resolution} is not a multiple of the VAE's downsampling factor {factor}; use e.g. "
            f"--resolution {(args.resolution // factor + 1) * factor}."
        )
    return config, kwargs


def fingerprint_shards(source: ImageSource, bounds: list[tuple], state: PartialState) -> list[str]:
    """Every shard's content fingerprint, on every process; each process hashes the shards it would encode."""
    mine = range(state.process_index, len(bounds), state.num_processes)
    progress = tqdm(mine, desc="Fingerprinting", disable=not state.is_local_main_process)
    found = {k: source.fingerprint(*bounds[k]) for k in progress}
    gathered = {k: fp for part in gather_object([found]) for k, fp in part.items()}
    return [gathered[k] for k in range(len(bounds))]


def encode_shard(
    source: ImageSource,
    start: int,
    end: int,
    args: argparse.Namespace,
    vae: AutoencoderKL | None,
    latent_shape: list[int],
    progress: tqdm,
    text_encoders=None,
) -> tuple[dict[str, list], list[dict], str]:
    """Encode input images `start..end`: the cache columns of the readable ones, what was skipped and why, and the
    fingerprint of the bytes that were read."""
    num_views = 2 if args.random_flip else 1
    loader = torch.utils.data.DataLoader(
        ImageRows(source, start, end, args.resolution),
        batch_size=args.batch_size,
        num_workers=args.dataloader_num_workers,
        collate_fn=list,
    )
    rows = {"mean": [], "std": [], "label": [], "source": []}
    skipped, digests = [], []
    for batch in loader:
        for i, _, error, digest in batch:
            digests.append(digest)
            if error is None:
                continue
            if args.strict:
                raise UserError(
                    f"Cannot read image {source.ids[i]}: {error}. Fix or remove it, or run without "
                    "--strict to skip unreadable images."
                )
            logger.warning(f"Skipping unreadable image {source.ids[i]}: {error}", main_process_only=False)
            skipped.append({"source": source.ids[i], "error": error})
        good = [(i, pixels) for i, pixels, error, _ in batch if error is None]
        progress.update(len(batch))
        if not good:
            continue
        x = to_model_input(torch.stack([p for _, p in good]), args.random_flip)  # (B, V, 3, H, W)
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
        if text_encoders is not None:  # the caption's encoding joins its image's row
            for encoded in text_encoders.encode([source.captions[i] for i, _ in good]):
                for name, value in encoded.items():
                    rows.setdefault(name, []).append(value)
    return rows, skipped, source.fingerprint(start, end, digests)


def make_state() -> PartialState:
    """Accelerate's process state; several processes without a GPU share the work on CPU (gloo)."""
    state = PartialState(cpu=run_on_cpu())
    check_world_size(state.num_processes)
    return state


class ArgumentParser(argparse.ArgumentParser):
    """argparse whose errors are UserErrors: one line and exit code 2 through `run_script`, no usage dump."""

    def error(self, message: str) -> NoReturn:
        raise UserError(f"{message} (see --help)")


def parse_args(input_args: list[str] | None = None) -> argparse.Namespace:
    """Parse the command line."""
    parser = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
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
        "--caption_column",
        type=str,
        default=None,
        help="Column of captions in --dataset_name, or the field of each line of metadata.jsonl in --train_data_dir "
        '(as diffusers\' imagefolder: {"file_name": ..., "text": ...}): a text-to-image cache, whose rows hold '
        "the caption's encoding by the frozen text encoders of --pretrained_model_name_or_path (PixArt-alpha/Sigma "
        "or SD3). One (image, caption) row is the unit of privacy.",
    )
    data.add_argument(
        "--max_sequence_length",
        type=int,
        default=None,
        help="T5 tokens per caption (default: the pipeline's: 300 PixArt-Sigma, 120 PixArt-alpha, 77 SD3 as "
        "diffusers' SD3 LoRA script).",
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
        "--random_flip",
        "--flip",
        action="store_true",
        help="Also encode the mirrored image, into the same row, so that training flips at random (the "
        "augmentation stays in the image's row, the unit of privacy). --flip is the former name.",
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
        "Re-running with the same settings resumes an unfinished cache (encoding again the finished shards whose "
        "images changed) and leaves a finished cache of the same input as it is.",
    )
    out.add_argument(
        "--overwrite_output_dir",
        action="store_true",
        help="Replace a cache in --output_dir that cannot be kept: one made with other settings, or a finished one "
        "whose input images, names or labels changed (without it the script stops and says what differs). A cache "
        "that matches is still resumed or kept; a directory holding anything else is never touched.",
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
        help="Stop on an unreadable image instead of skipping it (skips are listed in the metadata). Without it, a "
        "class whose images are all unreadable still stops the run, naming the class.",
    )
    args = parser.parse_args(input_args)
    args.argv = list(sys.argv[1:] if input_args is None else input_args)
    if (args.dataset_name is None) == (args.train_data_dir is None):
        raise UserError("Give exactly one of --dataset_name or --train_data_dir.")
    if args.vae is not None and args.pretrained_model_name_or_path is not None:
        raise UserError("Give --vae or --pretrained_model_name_or_path (whose vae/ is used), not both.")
    if args.caption_column is not None and args.pretrained_model_name_or_path is None:
        raise UserError(
            "--caption_column needs --pretrained_model_name_or_path: the pipeline whose text encoders "
            "encode the captions (PixArt-alpha/Sigma or SD3)."
        )
    if args.train_data_dir is not None and args.label_column not in (None, "none"):
        raise UserError("--label_column is for --dataset_name; --train_data_dir takes labels from its sub-folders.")
    for flag in ("resolution", "batch_size", "shard_size"):
        if getattr(args, flag) < 1:
            raise UserError(f"--{flag} must be positive, got {getattr(args, flag)}.")
    if args.dataloader_num_workers < 0:
        raise UserError(f"--dataloader_num_workers must be 0 or more, got {args.dataloader_num_workers}.")
    if args.mixed_precision is None:
        args.mixed_precision = os.environ.get("ACCELERATE_MIXED_PRECISION", "no")
        if args.mixed_precision not in ("no", "fp16", "bf16"):
            raise UserError(
                f"accelerate's mixed precision {args.mixed_precision}: pass --mixed_precision no/fp16/bf16."
            )
    return args


def main(args: argparse.Namespace) -> None:
    """Validate everything, encode this process's unfinished shards, then merge them on the main process."""
    state = make_state()
    # force: an imported library may already have configured the root logger, which would hide our INFO lines.
    logging.basicConfig(format="%(asctime)s - %(levelname)s - %(name)s - %(message)s", level=logging.INFO, force=True)
    datasets.disable_progress_bars()  # one bar of our own instead of one per shard save

    # Everything that can be wrong with the inputs is checked here, before anything is written.
    output_dir = Path(args.output_dir).absolute()
    shards_dir = output_dir / SHARDS_DIR
    found, finished = read_output_dir(output_dir)
    source = read_input(args)
    vae_config, vae_kwargs = load_vae_config(args)
    pixel_space = vae_config is None
    factor = 1 if pixel_space else 2 ** (len(vae_config["block_out_channels"]) - 1)
    channels = 3 if pixel_space else vae_config["latent_channels"]
    latent_shape = [channels, args.resolution // factor, args.resolution // factor]
    num_views = 2 if args.random_flip else 1
    vae_id = vae_kwargs.get("pretrained_model_name_or_path")
    settings = {
        "format_version": CACHE_FORMAT_VERSION,
        "input": os.path.abspath(args.train_data_dir) if args.train_data_dir else args.dataset_name,
        "dataset_config_name": args.dataset_config_name,
        "data_dir": args.data_dir,
        "split": None if args.train_data_dir else args.split,
        "image_column": None if args.train_data_dir else args.image_column,
        "conditional": source.labels is not None,
        "vae": os.path.abspath(vae_id) if vae_id and os.path.isdir(vae_id) else vae_id,
        "vae_subfolder": vae_kwargs.get("subfolder"),
        "resolution": args.resolution,
        "flip": args.random_flip,
        "mixed_precision": "no" if pixel_space else args.mixed_precision,
        "shard_size": args.shard_size,
        "caption_column": args.caption_column,
        "max_sequence_length": args.max_sequence_length,
    }
    replace = found is not None and found.get("settings") != settings
    if replace and not args.overwrite_output_dir:
        raise UserError(
            f"--output_dir {output_dir} holds a cache made with different settings "
            f"({settings_diff(found.get('settings') or {}, settings)}). Pick another --output_dir, or pass "
            "--overwrite_output_dir to replace it."
        )

    num_shards = -(-len(source.ids) // args.shard_size)
    bounds = [(k * args.shard_size, min((k + 1) * args.shard_size, len(source.ids))) for k in range(num_shards)]
    fingerprints = fingerprint_shards(source, bounds, state)
    input_fingerprint = hashlib.sha256(json.dumps([source.class_names, fingerprints]).encode()).hexdigest()
    if finished and not replace:
        if found.get("input_fingerprint") == input_fingerprint:
            logger.info(f"{output_dir} already holds this finished cache of this input; nothing to do.")
            return
        if not args.overwrite_output_dir:
            raise UserError(
                f"--output_dir {output_dir} holds a finished cache of a different input "
                f"({describe_change(found, source, bounds, fingerprints)}). Pick another --output_dir to keep it, "
                "or pass --overwrite_output_dir to encode the new input into it."
            )
        replace = True
    vae = None
    if not pixel_space:
        dtype = {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[args.mixed_precision]
        vae = AutoencoderKL.from_pretrained(**vae_kwargs, torch_dtype=dtype).to(state.device).requires_grad_(False)
    features = cache_features((num_views, *latent_shape), pixel_space, source.class_names)
    text_encoders = caption_encoders(args, state.device, vae.dtype if vae is not None else torch.float32)
    if text_encoders is not None:
        features.update(text_encoders.features())

    state.wait_for_everyone()  # every process has read the old cache before the main one replaces it
    if state.is_main_process:
        if replace:
            logger.warning(f"--overwrite_output_dir: replacing the cache in {output_dir}.")
            remove_cache(output_dir)
        shards_dir.mkdir(parents=True, exist_ok=True)
        write_json(shards_dir / SETTINGS_NAME, settings)
    state.wait_for_everyone()

    mine = list(range(state.process_index, num_shards, state.num_processes))
    markers = {k: shard_marker(shards_dir, k) for k in mine}
    encoded = {k: json.loads(markers[k].read_text()).get("fingerprint") for k in mine if markers[k].is_file()}
    changed = [k for k, fingerprint in encoded.items() if fingerprint != fingerprints[k]]
    if changed:
        logger.warning(
            f"The images of finished shards {changed} changed since they were encoded: encoding them again.",
            main_process_only=False,
        )
    todo = [k for k in mine if encoded.get(k) != fingerprints[k]]
    logger.info(
        f"{len(source.ids)} images in {num_shards} shards. Process {state.process_index} of "
        f"{state.num_processes}: shards {mine}, {len(mine) - len(todo)} done before.",
        main_process_only=False,
    )
    progress = tqdm(
        total=sum(bounds[k][1] - bounds[k][0] for k in todo), desc="Encoding", disable=not state.is_local_main_process
    )
    for k in todo:
        rows, skipped, fingerprint = encode_shard(source, *bounds[k], args, vae, latent_shape, progress, text_encoders)
        save_shard(shards_dir, k, rows, skipped, fingerprint, features)
    progress.close()
    state.wait_for_everyone()

    # Every process checks, so that all of them stop together on an error.
    done = [json.loads(shard_marker(shards_dir, k).read_text()) for k in range(num_shards)]
    skipped = check_shards(source, done, bounds, fingerprints)
    if state.is_main_process:
        merged = merge_shards(output_dir, done)
        if text_encoders is not None:  # caption dropout's stand-in
            text_encoders.save_empty_prompt(output_dir / EMPTY_PROMPT_NAME)
        info = {
            "format_version": CACHE_FORMAT_VERSION,
            "num_rows": len(merged),
            "latent_shape": latent_shape,
            "channels": channels,
            "num_views": num_views,
            "flip": args.random_flip,
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
            "num_inputs": len(source.ids),
            "input_fingerprint": input_fingerprint,
            "shard_fingerprints": fingerprints,
            "captions": text_encoders.describe() if text_encoders is not None else None,
        }
        write_json(output_dir / CACHE_INFO_NAME, info)  # last: its presence means the cache is finished
        shutil.rmtree(shards_dir)
        logger.info(f"Wrote {len(merged)} rows to {output_dir}; skipped {len(skipped)} unreadable images.")
    state.wait_for_everyone()


if __name__ == "__main__":
    sys.exit(run_script(lambda: main(parse_args())))
