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

import math
import os
import re
import shutil
from pathlib import Path

from accelerate import Accelerator
from diffusers import DiTTransformer2DModel
from diffusers.training_utils import EMAModel

from ..errors import UserError
from .adapters import save_lora_weights, set_lora_weights

CHECKPOINT_NAME = re.compile(r"checkpoint-(\d+)")
TEMPORARY_PREFIX = ".incomplete-checkpoint-"


class TrainState:
    """Step and privacy ledger, checkpointed with the model so a resumed run never resets the budget."""

    def __init__(self, privacy: dict):
        self.step = 0
        self.privacy = privacy  # noise multiplier, sample rate, delta, planned steps: must match on resume
        self.accountant_history: list = []

    def state_dict(self) -> dict:
        return {"step": self.step, "privacy": self.privacy, "accountant_history": self.accountant_history}

    def load_state_dict(self, state: dict) -> None:
        for key in ("noise_multiplier", "sample_rate", "dataset_size", "max_grad_norm", "noise_multiplicity"):
            if not math.isclose(state["privacy"][key], self.privacy[key], rel_tol=1e-9):
                raise UserError(
                    f"The checkpoint was trained with {key}={state['privacy'][key]}, this run has "
                    f"{self.privacy[key]}: resuming would break the privacy accounting. Resume with the same "
                    "dataset and DP flags (--target_epsilon, --noise_multiplier, --logical_batch_size, ...)."
                )
        self.step, self.accountant_history = state["step"], state["accountant_history"]


def register_pretrained_hooks(accelerator: Accelerator, transformer: DiTTransformer2DModel, ema: EMAModel | None):
    """Save and load the transformer (and its EMA) in checkpoints as `save_pretrained` folders.

    The transformer is not `accelerator.prepare`d (the DP optimizer does its own all-reduce), so the hooks save
    it themselves; loading copies the weights in place, keeping the optimizer's references to the parameters.
    """

    lora = hasattr(transformer, "peft_config")  # a plain DiT config cannot describe the adapters

    def save_hook(models, weights, output_dir):
        if not accelerator.is_main_process:
            return
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


def resolve_checkpoint(resume_from_checkpoint: str, output_dir: str | os.PathLike) -> Path:
    """The folder `--resume_from_checkpoint` names: 'latest' is the newest complete checkpoint in `output_dir`."""
    if resume_from_checkpoint == "latest":
        found = list_checkpoints(output_dir)
        if not found:
            raise UserError(
                f"--resume_from_checkpoint latest: no complete checkpoint-<step> folder in {output_dir}. "
                "Drop --resume_from_checkpoint to start a new run, or give the checkpoint folder."
            )
        return found[-1]
    path = Path(resume_from_checkpoint)
    if not path.is_dir() and (Path(output_dir) / path).is_dir():
        path = Path(output_dir) / path  # `checkpoint-500`, as diffusers' scripts accept it
    if not path.is_dir():
        raise UserError(
            f"--resume_from_checkpoint {resume_from_checkpoint}: no such checkpoint folder. "
            f"Give a checkpoint-<step> folder or 'latest' (the newest in {output_dir})."
        )
    return path


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
