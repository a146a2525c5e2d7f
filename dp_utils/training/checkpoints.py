"""Checkpoints that are complete or absent: saved to a temporary folder, renamed to checkpoint-<step> when done.

A save killed midway leaves only a temporary folder, which `--resume_from_checkpoint latest` never picks; the
oldest checkpoints are deleted (`--checkpoints_total_limit`) only after the new one is complete. As in diffusers'
training scripts, `checkpoint-<step>/transformer/` (and `transformer_ema/`) are `save_pretrained` folders that
`DiTTransformer2DModel.from_pretrained` loads; the rest (optimizer, lr schedule, TrainState, every rank's RNG) is
Accelerate's. A LoRA run's `transformer/` holds its adapter (`pytorch_lora_weights.safetensors`, for the base it
was trained from; the frozen base is rebuilt the same way on resume) and its EMA is Accelerate's too.
Checkpoints hold RNG states that replay the run's draws: they are never published (see hub.py).
"""

from __future__ import annotations

import json
import math
import os
import pickle
import re
import shutil
from dataclasses import asdict
from pathlib import Path

from accelerate import Accelerator
from diffusers import DiTTransformer2DModel
from diffusers.loaders.lora_base import LORA_WEIGHT_NAME_SAFE
from diffusers.training_utils import EMAModel

from ..errors import UserError, one_line
from .adapters import save_lora_weights, set_lora_weights
from .plan import PrivacyParameters

CHECKPOINT_NAME = re.compile(r"checkpoint-(\d+)")
TEMPORARY_PREFIX = ".incomplete-checkpoint-"
TRAINED_NAME = "trained.json"  # what the run trains: a resume with other flags could not load the optimizer state
ACCELERATE_STATE = "random_states_0.pkl"  # written by accelerator.save_state in every checkpoint


class TrainState:
    """Step, privacy parameters and accountant history, checkpointed with the model so that a resumed run never
    resets the budget."""

    def __init__(self, privacy_parameters: PrivacyParameters):
        self.step = 0
        self.privacy_parameters = privacy_parameters
        self.accountant_history: list = []

    def state_dict(self) -> dict:
        return {
            "step": self.step,
            "privacy_parameters": asdict(self.privacy_parameters),
            "accountant_history": self.accountant_history,
        }

    def load_state_dict(self, state: dict) -> None:
        saved, ours = state["privacy_parameters"], asdict(self.privacy_parameters)
        for key in PrivacyParameters.MUST_MATCH:
            if not math.isclose(saved[key], ours[key], rel_tol=1e-9):
                raise UserError(
                    f"The checkpoint was trained with {key}={saved[key]}, this run has {ours[key]}: resuming would "
                    "break the privacy accounting. Resume with the same dataset and DP flags (--target_epsilon, "
                    "--noise_multiplier, --logical_batch_size, ...)."
                )
        self.step, self.accountant_history = state["step"], state["accountant_history"]


def what_is_trained(args) -> dict:
    """The flags that decide which parameters train (and so the optimizer state): a resume must give the same."""
    lora = args.trainable == "lora"
    return dict(
        trainable=args.trainable,
        embedders=args.embedders,
        lora_rank=args.lora_rank if lora else None,
        lora_alpha=(args.lora_alpha or args.lora_rank) if lora else None,
        lora_target_modules=sorted(args.lora_target_modules) if lora else None,
    )


def register_pretrained_hooks(
    accelerator: Accelerator, transformer: DiTTransformer2DModel, ema: EMAModel | None, trained: dict
):
    """Save and load the transformer (and its EMA) in checkpoints as `save_pretrained` folders, beside `trained`.

    The transformer is not `accelerator.prepare`d (the DP optimizer does its own all-reduce), so the hooks save
    it themselves; loading copies the weights in place, keeping the optimizer's references to the parameters.
    """

    lora = hasattr(transformer, "peft_config")  # a plain DiT config cannot describe the adapters

    def save_hook(models, weights, output_dir):
        if not accelerator.is_main_process:
            return
        (Path(output_dir) / TRAINED_NAME).write_text(json.dumps(trained, indent=2))
        if lora:
            save_lora_weights(transformer, Path(output_dir) / "transformer")
            return
        transformer.save_pretrained(Path(output_dir) / "transformer")
        if ema is not None:
            ema.save_pretrained(str(Path(output_dir) / "transformer_ema"))

    def load_hook(models, input_dir):
        if lora:
            set_lora_weights(transformer, Path(input_dir) / "transformer")
            return
        saved = type(transformer).from_pretrained(Path(input_dir) / "transformer")
        transformer.load_state_dict(saved.state_dict())
        if ema is not None:
            saved_ema = EMAModel.from_pretrained(str(Path(input_dir) / "transformer_ema"), type(transformer))
            ema.load_state_dict(saved_ema.state_dict())
            ema.to(accelerator.device)

    accelerator.register_save_state_pre_hook(save_hook)
    accelerator.register_load_state_pre_hook(load_hook)
    if lora and ema is not None:  # its shadow weights follow the adapted model's parameters, not a plain DiT's
        accelerator.register_for_checkpointing(ema)


def list_checkpoints(output_dir: str | os.PathLike) -> list[Path]:
    """The complete checkpoints in `output_dir`, oldest step first; temporary and foreign folders are skipped."""
    out = Path(output_dir)
    if not out.is_dir():
        return []
    steps = {}
    for path in out.iterdir():
        match = CHECKPOINT_NAME.fullmatch(path.name)
        if match and path.is_dir():
            steps[int(match.group(1))] = path
    return [steps[step] for step in sorted(steps)]


def resolve_checkpoint(resume_from_checkpoint: str, output_dir: str | os.PathLike, trained: dict) -> Path:
    """The folder `--resume_from_checkpoint` names ('latest': the newest complete checkpoint in `output_dir`),
    checked to be a checkpoint of this trainer that trained what this run trains."""
    if resume_from_checkpoint == "latest":
        found = list_checkpoints(output_dir)
        if not found:
            raise UserError(
                f"--resume_from_checkpoint latest: no complete checkpoint-<step> folder in {output_dir}. "
                "Drop --resume_from_checkpoint to start a new run, or give the checkpoint folder."
            )
        check_checkpoint(found[-1], resume_from_checkpoint, trained)
        return found[-1]
    path = Path(resume_from_checkpoint)
    if not path.is_dir() and (Path(output_dir) / path).is_dir():
        path = Path(output_dir) / path  # `checkpoint-500`, as diffusers' scripts accept it
    if not path.is_dir():
        raise UserError(
            f"--resume_from_checkpoint {resume_from_checkpoint}: no such checkpoint folder. "
            f"Give a checkpoint-<step> folder or 'latest' (the newest in {output_dir})."
        )
    check_checkpoint(path, resume_from_checkpoint, trained)
    return path


def check_checkpoint(path: Path, flag_value: str, trained: dict) -> None:
    """A checkpoint-<step> folder of train_dp_dit.py, written for the same trained parameters as this run."""
    if not ((path / "transformer").is_dir() and (path / ACCELERATE_STATE).is_file()):
        raise UserError(
            f"--resume_from_checkpoint {flag_value}: {path} is not a checkpoint of train_dp_dit.py (a "
            f"checkpoint-<step> folder holds transformer/ and {ACCELERATE_STATE}). Give a checkpoint of this run."
        )
    try:
        saved = json.loads((path / TRAINED_NAME).read_text())
    except (OSError, ValueError):  # an older checkpoint: only whether it trained LoRA shows, in its transformer/
        saved_lora = (path / "transformer" / LORA_WEIGHT_NAME_SAFE).is_file()
        saved = {"trainable": "lora" if saved_lora else "full or attention"}
        trained = {"trainable": trained["trainable"]} if saved_lora != (trained["trainable"] == "lora") else {}
    differ = [key for key in trained if saved.get(key) != trained[key]]
    differ = [key for key in differ if None not in (saved.get(key), trained[key])] or differ  # LoRA's keys: both
    if differ:
        raise UserError(
            f"--resume_from_checkpoint {flag_value} was trained with "
            + ", ".join(f"--{key} {saved.get(key)}" for key in differ)
            + "; this run has "
            + ", ".join(f"--{key} {trained[key]}" for key in differ)
            + ". Resume with the flags the checkpoint was trained with, or start a new run in another --output_dir."
        )


def load_checkpoint(accelerator: Accelerator, path: Path) -> None:
    """`accelerator.load_state`; a file it cannot read, or state of another shape, is a UserError."""
    try:
        accelerator.load_state(str(path))
    except UserError:  # TrainState's own refusal: other privacy parameters
        raise
    except (OSError, RuntimeError, ValueError, KeyError, EOFError, pickle.UnpicklingError) as error:
        raise UserError(
            f"--resume_from_checkpoint {path} cannot be loaded into this run ({one_line(error)}): it is damaged, or "
            "was written by a run of another model or dataset. Resume from another checkpoint, or start a new run."
        ) from None


def save_checkpoint(
    accelerator: Accelerator, output_dir: str | os.PathLike, step: int, total_limit: int | None
) -> Path:
    """`accelerator.save_state` to output_dir/checkpoint-{step}, atomically; then keep at most `total_limit`."""
    out = Path(output_dir)
    final, temporary = out / f"checkpoint-{step}", out / f"{TEMPORARY_PREFIX}{step}"
    if accelerator.is_main_process:
        for stale in out.glob(f"{TEMPORARY_PREFIX}*"):  # left by a save that was killed
            shutil.rmtree(stale)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(temporary))  # every rank writes its RNG state into the same folder
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        if final.exists():  # the same step saved by an earlier attempt (a resumed run): replaced only now
            replaced = out / f"{TEMPORARY_PREFIX}{step}-replaced"
            final.rename(replaced)
            temporary.rename(final)
            shutil.rmtree(replaced)
        else:
            temporary.rename(final)
        if total_limit:
            for old in list_checkpoints(out)[:-total_limit]:
                shutil.rmtree(old)
    accelerator.wait_for_everyone()
    return final
