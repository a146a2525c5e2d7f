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

The input is split into shards of --shard_size images; each is saved, then marked finished, so a killed run resumes
from the finished shards and several processes split them. The main process merges the shards into one dataset
(`datasets.load_from_disk`) and writes `cache_info.json` last: a folder without it is not a finished cache (format:
dp_utils/data/latent_cache.py). Every run first fingerprints the input by content (SHA-256 of each image's bytes, name
and label). Running the same command again does nothing on a finished cache of the same input, resumes an unfinished
one (encoding again the finished shards whose images changed), and stops, saying what differs, on a cache of other
images, settings, or a damaged one, unless --overwrite_output_dir is given.

With --caption_column each row also holds its caption's encoding by the frozen text encoders of a PixArt-alpha/Sigma
or SD3 pipeline (dp_utils/data/captions.py, docs/text_to_image.md).

Images of any mode become 8-bit RGB (dp_utils/data/images.py), resized and centre-cropped as DiT/ADM do. Unreadable
images are skipped with a warning and listed in cache_info.json (--strict: an error); a class whose images are all
unreadable stops the run, naming it.

Mistakes in the flags or inputs stop the script before anything is written, with `error: <what and how to fix it>`
and exit code 2.
"""

import argparse
import hashlib
import json
import logging
import os
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

import datasets
import torch
from accelerate import PartialState
from accelerate.logging import get_logger
from accelerate.utils import gather_object
from diffusers import AutoencoderKL
from tqdm.auto import tqdm

from dp_utils.data.captions import EMPTY_PROMPT_NAME, caption_encoders, read_captions
from dp_utils.data.encoding import encode_shard
from dp_utils.data.images import ImageSource, read_dataset, read_image_folder
from dp_utils.data.latent_cache import (
    CACHE_FORMAT_VERSION,
    CACHE_INFO_NAME,
    SETTINGS_NAME,
    SHARDS_DIR,
    cache_features,
    cache_info,
    check_shards,
    describe_change,
    finished_shard,
    load_latent_cache,
    merge_shards,
    read_markers,
    read_output_dir,
    remove_cache,
    save_shard,
    settings_diff,
    write_json,
)
from dp_utils.errors import ArgumentParser, UserError, check_num_workers, check_writable_dir, run_script
from dp_utils.training.distributed import check_world_size, run_on_cpu
from dp_utils.training.pretrained import from_pretrained

logger = get_logger(__name__)

DEFAULT_VAE = "stabilityai/sd-vae-ft-ema"


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


def add_input_arguments(parser: argparse.ArgumentParser) -> None:
    """Where the images come from."""
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
        "(as diffusers' imagefolder): a text-to-image cache whose rows hold the caption's encoding by the frozen "
        "text encoders of --pretrained_model_name_or_path (PixArt or SD3). The unit of privacy: one (image, caption).",
    )
    data.add_argument(
        "--max_sequence_length",
        type=int,
        default=None,
        help="T5 tokens per caption (default: the pipeline's: 300 PixArt-Sigma, 120 PixArt-alpha, 77 SD3).",
    )
    data.add_argument(
        "--train_data_dir",
        type=str,
        default=None,
        help="A folder with one sub-folder of images per class (labels from the sorted folder names), "
        "or a folder of images only (unconditional).",
    )


def add_encoding_arguments(parser: argparse.ArgumentParser) -> None:
    """How they are encoded."""
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


def add_output_arguments(parser: argparse.ArgumentParser) -> None:
    """Where the cache goes and how it is saved."""
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


def parse_args(input_args: list[str] | None = None) -> argparse.Namespace:
    """Parse the command line and check the flags that need no file."""
    parser = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_input_arguments(parser)
    add_encoding_arguments(parser)
    add_output_arguments(parser)
    args = parser.parse_args(input_args)
    args.argv = list(sys.argv[1:] if input_args is None else input_args)
    if (args.dataset_name is None) == (args.train_data_dir is None):
        raise UserError("Give exactly one of --dataset_name or --train_data_dir.")
    if args.vae is not None and args.pretrained_model_name_or_path is not None:
        raise UserError("Give --vae or --pretrained_model_name_or_path (whose vae/ is used), not both.")
    if args.train_data_dir is not None and args.label_column not in (None, "none"):
        raise UserError("--label_column is for --dataset_name; --train_data_dir takes labels from its sub-folders.")
    if args.caption_column is not None and args.pretrained_model_name_or_path is None:
        raise UserError(
            "--caption_column needs --pretrained_model_name_or_path: the pipeline whose text encoders "
            "encode the captions (PixArt-alpha/Sigma or SD3)."
        )
    for flag in ("resolution", "batch_size", "shard_size"):
        if getattr(args, flag) < 1:
            raise UserError(f"--{flag} must be positive, got {getattr(args, flag)}.")
    check_num_workers(args.dataloader_num_workers)
    if args.mixed_precision is None:
        args.mixed_precision = os.environ.get("ACCELERATE_MIXED_PRECISION", "no")
        if args.mixed_precision not in ("no", "fp16", "bf16"):
            raise UserError(
                f"accelerate's mixed precision {args.mixed_precision}: pass --mixed_precision no/fp16/bf16."
            )
    return args


@dataclass
class CachePlan:
    """What this run encodes and into what: fixed before anything is written."""

    output_dir: Path
    source: ImageSource
    settings: dict  # what a resumed cache must have been made with
    latent_shape: list[int]  # (C, H, W) of one view
    bounds: list[tuple[int, int]]  # each shard's input images start..end
    fingerprints: list[str]  # each shard's content fingerprint
    input_fingerprint: str

    @property
    def shards_dir(self) -> Path:
        return self.output_dir / SHARDS_DIR


def cache_settings(args: argparse.Namespace, source: ImageSource, vae_kwargs: dict) -> dict:
    """The settings that shape the rows: a cache made with other ones is not resumed."""
    vae_id = vae_kwargs.get("pretrained_model_name_or_path")
    return {
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
        "mixed_precision": "no" if vae_id is None else args.mixed_precision,
        "shard_size": args.shard_size,
        "caption_column": args.caption_column,
        "max_sequence_length": args.max_sequence_length,
    }


def plan_cache(
    args: argparse.Namespace, state: PartialState, source: ImageSource, vae_config, vae_kwargs
) -> CachePlan:
    """Latent shape, shards and their fingerprints (read on every process) for this input."""
    factor = 1 if vae_config is None else 2 ** (len(vae_config["block_out_channels"]) - 1)
    channels = 3 if vae_config is None else vae_config["latent_channels"]
    n, size = len(source.ids), args.shard_size
    bounds = [(start, min(start + size, n)) for start in range(0, n, size)]
    fingerprints = fingerprint_shards(source, bounds, state)
    return CachePlan(
        output_dir=Path(args.output_dir).absolute(),
        source=source,
        settings=cache_settings(args, source, vae_kwargs),
        latent_shape=[channels, args.resolution // factor, args.resolution // factor],
        bounds=bounds,
        fingerprints=fingerprints,
        input_fingerprint=hashlib.sha256(json.dumps([source.class_names, fingerprints]).encode()).hexdigest(),
    )


def replace_or_keep(args: argparse.Namespace, plan: CachePlan, found: dict | None, finished: bool) -> bool | None:
    """Whether the cache in --output_dir must be replaced (False: resume or start it); None: it is done already."""
    out, overwrite = plan.output_dir, args.overwrite_output_dir
    if found is not None and "damaged" in found:
        if not overwrite:
            raise UserError(
                f"--output_dir {out} holds a damaged cache ({found['damaged']}). Pass --overwrite_output_dir to "
                "encode it again, or pick another --output_dir."
            )
        return True
    if found is not None and found.get("settings") != plan.settings:
        if not overwrite:
            raise UserError(
                f"--output_dir {out} holds a cache made with different settings "
                f"({settings_diff(found.get('settings') or {}, plan.settings)}). Pick another --output_dir, or pass "
                "--overwrite_output_dir to replace it."
            )
        return True
    if not finished:
        return False
    if found.get("input_fingerprint") != plan.input_fingerprint:
        if not overwrite:
            raise UserError(
                f"--output_dir {out} holds a finished cache of a different input "
                f"({describe_change(found, plan.source, plan.bounds, plan.fingerprints)}). Pick another --output_dir "
                "to keep it, or pass --overwrite_output_dir to encode the new input into it."
            )
        return True
    try:
        load_latent_cache(out)  # its rows must be readable too
    except UserError as error:
        if not overwrite:
            raise
        logger.warning(f"{error} Encoding it again (--overwrite_output_dir).")
        return True
    return None


def encode_my_shards(args, state: PartialState, plan: CachePlan, vae, features, text_encoders) -> None:
    """Encode this process's shards that are not finished, or whose images changed since."""
    mine = list(range(state.process_index, len(plan.bounds), state.num_processes))
    encoded = {k: marker["fingerprint"] for k in mine if (marker := finished_shard(plan.shards_dir, k))}
    changed = [k for k, fingerprint in encoded.items() if fingerprint != plan.fingerprints[k]]
    if changed:
        logger.warning(
            f"The images of finished shards {changed} changed since they were encoded: encoding them again.",
            main_process_only=False,
        )
    todo = [k for k in mine if encoded.get(k) != plan.fingerprints[k]]
    logger.info(
        f"{len(plan.source.ids)} images in {len(plan.bounds)} shards. Process {state.process_index} of "
        f"{state.num_processes}: shards {mine}, {len(mine) - len(todo)} done before.",
        main_process_only=False,
    )
    total = sum(plan.bounds[k][1] - plan.bounds[k][0] for k in todo)
    progress = tqdm(total=total, desc="Encoding", disable=not state.is_local_main_process)
    for k in todo:
        rows, skipped, fingerprint = encode_shard(
            plan.source, *plan.bounds[k], args, vae, plan.latent_shape, progress, text_encoders
        )
        save_shard(plan.shards_dir, k, rows, skipped, fingerprint, features)
    progress.close()


def main(args: argparse.Namespace) -> None:
    """Validate everything, encode this process's unfinished shards, then merge them on the main process."""
    state = PartialState(cpu=run_on_cpu())  # several processes without a GPU share the work on CPU (gloo)
    check_world_size(state.num_processes)
    # force: an imported library may already have configured the root logger, which would hide our INFO lines.
    logging.basicConfig(format="%(asctime)s - %(levelname)s - %(name)s - %(message)s", level=logging.INFO, force=True)
    datasets.disable_progress_bars()  # one bar of our own instead of one per shard save

    # Everything that can be wrong with the inputs is checked here, before anything is written.
    found, finished = read_output_dir(Path(args.output_dir).absolute())
    if args.cache_dir:
        check_writable_dir("--cache_dir", args.cache_dir)
    source = read_input(args)
    vae_config, vae_kwargs = load_vae_config(args)
    plan = plan_cache(args, state, source, vae_config, vae_kwargs)
    replace = replace_or_keep(args, plan, found, finished)
    if replace is None:
        logger.info(f"{plan.output_dir} already holds this finished cache of this input; nothing to do.")
        return
    vae = None
    if vae_config is not None:
        dtype = {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[args.mixed_precision]
        kwargs = dict(vae_kwargs, torch_dtype=dtype)
        path, flag = (
            kwargs.pop("pretrained_model_name_or_path"),
            "--vae" if args.vae else "--pretrained_model_name_or_path",
        )
        vae = from_pretrained(AutoencoderKL, path, flag, **kwargs)
        vae.to(state.device).requires_grad_(False)
    num_views = 2 if args.random_flip else 1
    features = cache_features((num_views, *plan.latent_shape), vae is None, source.class_names)
    text_encoders = caption_encoders(args, state.device, vae.dtype if vae is not None else torch.float32)
    if text_encoders is not None:
        features.update(text_encoders.features())

    state.wait_for_everyone()  # every process has read the old cache before the main one replaces it
    if state.is_main_process:
        if replace:
            logger.warning(f"--overwrite_output_dir: replacing the cache in {plan.output_dir}.")
            remove_cache(plan.output_dir)
        plan.shards_dir.mkdir(parents=True, exist_ok=True)
        write_json(plan.shards_dir / SETTINGS_NAME, plan.settings)
    state.wait_for_everyone()
    encode_my_shards(args, state, plan, vae, features, text_encoders)
    state.wait_for_everyone()

    # Every process checks, so that all of them stop together on an error.
    markers = read_markers(plan.shards_dir, len(plan.bounds))
    skipped = check_shards(source, markers, plan.bounds, plan.fingerprints)
    if state.is_main_process:
        merged = merge_shards(plan.output_dir, markers)
        if text_encoders is not None:  # caption dropout's stand-in
            text_encoders.save_empty_prompt(plan.output_dir / EMPTY_PROMPT_NAME)
        info = cache_info(args, plan, features, vae, len(merged), skipped)
        info["captions"] = text_encoders.describe() if text_encoders is not None else None
        write_json(plan.output_dir / CACHE_INFO_NAME, info)  # last: its presence means the cache is finished
        shutil.rmtree(plan.shards_dir)
        logger.info(f"Wrote {len(merged)} rows to {plan.output_dir}; skipped {len(skipped)} unreadable images.")
    state.wait_for_everyone()


if __name__ == "__main__":
    sys.exit(run_script(lambda: main(parse_args())))
