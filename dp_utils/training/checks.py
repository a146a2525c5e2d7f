"""The trainer's checks: every flag, path and combination refused before any compute, in a message with the fix.

`check_flags` needs only the parsed flags; `check_output_dir` and `check_model_source` look at the disk;
`check_data` runs once the cache is open (the dataset size N bounds delta). Each raises a UserError, which the
script prints as one line and exit code 2; nothing is written before they pass.
"""

from __future__ import annotations

import argparse
import math
import os
import re
from pathlib import Path

import accelerate.utils

from ..errors import UserError, check_num_workers, check_writable_dir
from .checkpoints import list_checkpoints
from .model import PRESETS

FINISHED_RUN = "privacy_report.json"  # written last, by the main process, when a run has finished
FINISHED_RUN_FILES = (
    FINISHED_RUN,
    "README.md",
    "model_index.json",
    "transformer",
    "scheduler",
    "vae",
    "samples",
    "pytorch_lora_weights.safetensors",
)
HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[\w.-]+)?")
SMALL_DATASET = 1000  # below this many images, DP-SGD's noise swamps the signal at any usual epsilon


def _need(ok: bool, message: str) -> None:
    if not ok:
        raise UserError(message)


def _finite(value: float, low: float, high: float = math.inf, low_inclusive: bool = True) -> bool:
    above = value >= low if low_inclusive else value > low
    return math.isfinite(value) and above and value <= high


def check_flags(args: argparse.Namespace) -> None:
    """Ranges, finiteness and combinations of the trainer's flags (no file is read)."""
    _check_privacy_flags(args)
    _check_training_flags(args)
    _check_modes(args)
    _check_trainable_and_outputs(args)


def _check_privacy_flags(args: argparse.Namespace) -> None:
    """The model source and the DP parameters: sigma or a budget, C, delta."""
    _need(
        bool(args.pretrained_model_name_or_path) != bool(args.model_config),
        "Give exactly one of --pretrained_model_name_or_path or --model_config.",
    )
    if args.noise_multiplier is not None:
        _need(
            _finite(args.noise_multiplier, 0),
            f"--noise_multiplier must be finite and >= 0, got {args.noise_multiplier}: pass the noise std over the "
            "clipping norm (about 0.5 to 5), or --target_epsilon to calibrate it.",
        )
    if args.target_epsilon is not None:
        _need(
            _finite(args.target_epsilon, 0, low_inclusive=False),
            f"--target_epsilon must be finite and > 0, got {args.target_epsilon}: pass a budget such as 8.",
        )
    _need(
        _finite(args.max_grad_norm, 0, low_inclusive=False),
        f"--max_grad_norm must be finite and > 0, got {args.max_grad_norm}: pass a clipping norm such as 1.0.",
    )
    if args.delta is not None:
        _need(
            _finite(args.delta, 0, 1, low_inclusive=False) and args.delta < 1,
            f"--delta must be in (0, 1), got {args.delta}: leave it out for 1 / (10 N), well below 1/N.",
        )


def _check_training_flags(args: argparse.Namespace) -> None:
    """Lengths, batch sizes, intervals, optimizer, EMA and sampling settings."""
    for flag in ("max_train_steps", "num_train_epochs", "max_train_samples"):
        value = getattr(args, flag)
        _need(value is None or value >= 1, f"--{flag} must be >= 1, got {value}.")
    for flag in ("logical_batch_size", "max_physical_batch_size", "noise_multiplicity", "num_validation_images"):
        _need(getattr(args, flag) >= 1, f"--{flag} must be >= 1, got {getattr(args, flag)}.")
    check_num_workers(args.dataloader_num_workers)
    for flag in ("checkpointing_steps", "validation_steps", "lr_warmup_steps"):
        _need(getattr(args, flag) >= 0, f"--{flag} must be >= 0 (0 disables it), got {getattr(args, flag)}.")
    _need(
        args.checkpoints_total_limit is None or args.checkpoints_total_limit >= 1,
        f"--checkpoints_total_limit must be >= 1, got {args.checkpoints_total_limit}; leave it out to keep all.",
    )
    _need(args.num_inference_steps >= 1, f"--num_inference_steps must be >= 1, got {args.num_inference_steps}.")
    _need(
        0 <= args.public_finisher_steps <= args.num_inference_steps,
        f"--public_finisher_steps must be in [0, --num_inference_steps], got {args.public_finisher_steps}.",
    )
    _need(
        not args.public_finisher_steps or args.pretrained_model_name_or_path,
        "--public_finisher_steps needs --pretrained_model_name_or_path: the public model that finishes the samples.",
    )
    _need(math.isfinite(args.guidance_scale), f"--guidance_scale must be finite, got {args.guidance_scale}.")
    _need(
        _finite(args.class_dropout_prob, 0, 1),
        f"--class_dropout_prob must be in [0, 1], got {args.class_dropout_prob} (DiT: 0.1).",
    )
    _need(
        _finite(args.proportion_empty_prompts, 0, 1),
        f"--proportion_empty_prompts must be in [0, 1], got {args.proportion_empty_prompts} (PixArt: 0.1).",
    )
    _need(
        _finite(args.learning_rate, 0, low_inclusive=False),
        f"--learning_rate must be finite and > 0, got {args.learning_rate} (DiT: 1e-4).",
    )
    for flag in ("adam_beta1", "adam_beta2"):
        _need(_finite(getattr(args, flag), 0) and getattr(args, flag) < 1, f"--{flag} must be in [0, 1).")
    _need(
        _finite(args.adam_weight_decay, 0),
        f"--adam_weight_decay must be finite and >= 0, got {args.adam_weight_decay}.",
    )
    _need(
        _finite(args.dp_adambc_gamma, 0, low_inclusive=False),
        f"--dp_adambc_gamma must be > 0, got {args.dp_adambc_gamma}.",
    )
    _need(
        _finite(args.sgd_momentum, 0) and args.sgd_momentum < 1,
        f"--sgd_momentum must be in [0, 1), got {args.sgd_momentum}.",
    )
    high = args.timestep_max
    _need(
        args.timestep_min >= 0 and (high is None or high >= args.timestep_min),
        f"--timestep_min/--timestep_max must satisfy 0 <= min <= max, got {args.timestep_min} and {high}.",
    )
    _need(_finite(args.ema_decay, 0, 1), f"--ema_decay must be in [0, 1], got {args.ema_decay} (DiT: 0.9999).")
    _need(0 <= args.seed < 2**32, f"--seed must be in [0, 2**32), got {args.seed}.")
    _need(
        args.noise_seed is None or args.noise_seed >= 0,
        f"--noise_seed must be >= 0, got {args.noise_seed}; leave it out for secret noise (the default).",
    )


def _check_modes(args: argparse.Namespace) -> None:
    """Combinations the clipping modes, the precision and the trackers cannot run."""
    opacus = args.grad_sample_mode.startswith("opacus")
    _need(
        args.grad_sample_mode != "opacus_ghost" or args.embedders == "freeze",
        "--grad_sample_mode opacus_ghost needs --embedders freeze: Opacus' ghost clipping refuses DiT's reused "
        "embedder. Add --embedders freeze, or use flash_bk, which trains every parameter.",
    )
    _need(
        not opacus or args.noise_multiplicity == 1,
        f"--noise_multiplicity > 1 needs --grad_sample_mode flash_bk or flash, not {args.grad_sample_mode}.",
    )
    _need(
        not opacus or not args.gradient_checkpointing,
        f"--gradient_checkpointing needs --grad_sample_mode flash_bk or flash: Opacus' hooks "
        f"({args.grad_sample_mode}) would record the recomputed forward as a second use of every layer.",
    )
    precision = args.mixed_precision or os.environ.get("ACCELERATE_MIXED_PRECISION", "no")
    _need(
        precision != "fp16",
        "--mixed_precision fp16 is not supported: fp16 needs loss scaling, and a scaled loss scales every "
        "per-example gradient norm against --max_grad_norm. Use --mixed_precision bf16 (or no).",
    )
    trackers = [t.value for t in accelerate.utils.LoggerType if t.value != "all"]
    _need(
        args.report_to in ("all", "none", *trackers),
        f"--report_to {args.report_to}: not a tracker accelerate knows; use none, all or {', '.join(trackers)}.",
    )
    if args.report_to in trackers:
        _need(
            getattr(accelerate.utils, f"is_{args.report_to}_available")(),
            f"--report_to {args.report_to}: the {args.report_to} package is not installed; install it, or pass "
            "--report_to none.",
        )


def _check_trainable_and_outputs(args: argparse.Namespace) -> None:
    """LoRA settings, what a run trains against what it saves, the Hub token, resume against overwrite."""
    _need(args.lora_rank >= 1, f"--lora_rank must be >= 1, got {args.lora_rank} (diffusers' scripts: 4 to 128).")
    _need(
        args.lora_alpha is None or _finite(args.lora_alpha, 0, low_inclusive=False),
        f"--lora_alpha must be finite and > 0, got {args.lora_alpha}; leave it out for the rank (scale 1).",
    )
    _need(
        args.trainable != "lora" or args.embedders == "freeze",
        "--embedders train with --trainable lora: the LoRA weights file cannot hold trained embedders. Use "
        "--trainable attention --embedders train, or --trainable full.",
    )
    _need(
        args.trainable == "lora" or not args.save_merged,
        f"--save_merged merges LoRA adapters: it needs --trainable lora (--trainable {args.trainable} saves the "
        "full pipeline anyway).",
    )
    _need(
        not (args.hub_token and args.report_to in ("wandb", "all")),
        "--hub_token with --report_to wandb would expose the token in the tracked config: log in with "
        "`hf auth login` instead of --hub_token.",
    )
    _need(
        not (args.overwrite_output_dir and args.resume_from_checkpoint),
        "--overwrite_output_dir deletes the checkpoints --resume_from_checkpoint would continue: give only one.",
    )


def check_output_dir(args: argparse.Namespace) -> None:
    """--output_dir can be written and holds no other run, unless this run resumes it or may overwrite it."""
    out = Path(args.output_dir)
    _need(not out.exists() or out.is_dir(), f"--output_dir {out} is a file: give a folder (new or empty).")
    check_writable_dir("--output_dir", out)
    if args.report_to not in (None, "none"):  # the tracker logs may go elsewhere (an absolute --logging_dir)
        check_writable_dir("--logging_dir", out / args.logging_dir)
    if args.cache_dir:
        check_writable_dir("--cache_dir", args.cache_dir)
    if args.resume_from_checkpoint or args.overwrite_output_dir:
        return
    finished = (out / FINISHED_RUN).is_file()
    _need(
        not finished,
        f"--output_dir {out} holds a finished run ({FINISHED_RUN}): give a new folder, or --overwrite_output_dir "
        "to replace it.",
    )
    _need(
        not list_checkpoints(out),
        f"--output_dir {out} holds checkpoints of an unfinished run: add --resume_from_checkpoint latest to "
        "continue it, or --overwrite_output_dir to start over.",
    )


def previous_run_files(output_dir: str | os.PathLike) -> list[Path]:
    """What --overwrite_output_dir deletes before training: old checkpoints and a finished run's model and card."""
    out = Path(output_dir)
    finished = [out / name for name in FINISHED_RUN_FILES] if (out / FINISHED_RUN).is_file() else []
    return list_checkpoints(out) + [path for path in finished if path.exists()]


def check_model_source(args: argparse.Namespace) -> None:
    """A local pipeline folder or config file exists; anything else must at least look like a Hub id."""
    if args.model_config:
        _need(
            args.model_config in PRESETS or Path(args.model_config).is_file(),
            f"--model_config {args.model_config} is neither a preset ({', '.join(PRESETS)}) nor a config.json file.",
        )
        return
    name = args.pretrained_model_name_or_path
    path = Path(name).expanduser()
    if path.exists():
        _need(
            (path / "transformer" / "config.json").is_file() and (path / "scheduler").is_dir(),
            f"--pretrained_model_name_or_path {name} is not a DiT pipeline folder (it needs transformer/ and "
            "scheduler/, as DiTPipeline.save_pretrained writes them).",
        )
    else:
        _need(
            HUB_ID.fullmatch(name) is not None,
            f"--pretrained_model_name_or_path {name}: no such folder. Check the path, or give a Hub id such as "
            "facebook/DiT-XL-2-256.",
        )


def check_data(args: argparse.Namespace, num_images: int, num_classes: int, conditional: bool, delta: float) -> None:
    """What the dataset bounds: delta below 1/N (unless accepted as weaker) and the validation classes."""
    _need(
        delta < 1 / num_images or args.accept_weak_delta,
        f"--delta {delta:.3g} is not below 1/N = {1 / num_images:.3g} for these {num_images} images: such a delta "
        "allows publishing one image in full. Leave --delta out (1 / (10 N)), or add --accept_weak_delta to "
        "accept the weaker guarantee (the privacy report and model card then say so).",
    )
    if args.validation_classes:
        _need(
            conditional,
            "--validation_classes: the cache has no labels (unconditional): leave --validation_classes out.",
        )
        bad = [c for c in args.validation_classes if not 0 <= c < num_classes]
        _need(
            not bad,
            f"--validation_classes {bad} out of range: the cache has {num_classes} classes (0 to {num_classes - 1}).",
        )


def run_warnings(num_images: int, logical_batch_size: int, delta: float) -> list[str]:
    """What the user should know before training: no subsampling, a weak delta, a tiny dataset."""
    warnings = []
    if logical_batch_size >= num_images:
        warnings.append(
            f"--logical_batch_size {logical_batch_size} >= N = {num_images}: every step uses every image (q = 1), "
            "so there is no privacy amplification by subsampling. A logical batch well below N spends less epsilon."
        )
    if delta >= 1 / num_images:
        warnings.append(
            f"delta = {delta:.3g} >= 1/N = {1 / num_images:.3g} (--accept_weak_delta): a weak guarantee, which a "
            "mechanism publishing one training image in full also meets."
        )
    if num_images < SMALL_DATASET:
        warnings.append(
            f"Only {num_images} images: with so few, the DP noise dominates the averaged gradient at any usual "
            "epsilon; expect poor samples unless epsilon is large or the dataset grows."
        )
    return warnings


def check_loss(loss: float, step: int, learning_rate: float) -> None:
    """Stop before the optimizer step when the loss is not finite, naming the likely cause."""
    _need(
        math.isfinite(loss),
        f"The loss is {loss} at step {step + 1}; training stopped before that step's update. Likely cause: a "
        f"learning rate too high (--learning_rate {learning_rate}: lower it and train again), or fp16 autocast "
        "without loss scaling.",
    )
