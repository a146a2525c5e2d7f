"""What DP fine-tuning trains: every parameter, the attention modules only (DP-LDM), or peft LoRA adapters.

Fewer trained parameters means less noise in total: each trained coordinate gets noise of std sigma C / B. LoRA
layers are `nn.Linear` pairs, which the clipping engine covers exactly; adapters it cannot clip (DoRA's magnitude
vector, LoRA on a layer without a rule) are refused before any compute.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

from diffusers.loaders.lora_base import LORA_ADAPTER_METADATA_KEY, LORA_WEIGHT_NAME_SAFE, LoraBaseMixin
from diffusers.models.attention_processor import Attention
from diffusers.utils.peft_utils import recurse_remove_peft_layers
from peft import LoraConfig, get_peft_model_state_dict, inject_adapter_in_model, set_peft_model_state_dict
from peft.tuners.tuners_utils import BaseTunerLayer
from safetensors import safe_open
from safetensors.torch import load_file
from torch import nn

from ..clipping.engine import UnsupportedModuleError, trainable_layers
from ..clipping.freezing import EMBEDDERS
from ..errors import UserError
from .variance import FixedRows

TRAINABLE = ("full", "attention", "lora")
LORA_TARGET_MODULES = ["to_q", "to_k", "to_v", "to_out.0"]  # the attention projections, as diffusers' LoRA scripts
LORA_PREFIX = "transformer"  # the pipeline component the keys belong to, as `save_lora_weights` writes them


@dataclass
class TrainedParameters:
    """What a run trains; its fields are entries of the privacy report."""

    trainable: str  # full, attention or lora
    trained_parameters: int  # scalars the DP mechanism updates (fixed variance rows excluded)
    total_parameters: int  # scalars of the model, adapters included
    trained: list[str]  # parameter names, block indices folded (transformer_blocks.*.attn1.to_q.weight)
    frozen: list[str]
    fixed_rows: list[str]  # parameters of which some rows stay fixed (the learned-variance half)
    lora: dict | None = None  # rank, alpha and target modules

    def describe(self) -> str:
        share = self.trained_parameters / max(self.total_parameters, 1)
        fixed = f"; fixed rows (variance half) of {', '.join(self.fixed_rows)}" if self.fixed_rows else ""
        return (
            f"training {self.trained_parameters:,} of {self.total_parameters:,} parameters ({share:.2%}, "
            f"{self.trainable}){fixed}"
        )


def fold_block_index(name: str) -> str:
    """`transformer_blocks.3.attn1.to_q.weight` -> `transformer_blocks.*.attn1.to_q.weight`."""
    return re.sub(r"^transformer_blocks\.\d+\.", "transformer_blocks.*.", name)


def _folded(names: list[str]) -> list[str]:
    return list(dict.fromkeys(fold_block_index(n) for n in names))


def lora_config(rank: int, alpha: float | None, target_modules: list[str]) -> LoraConfig:
    """peft's LoraConfig as the trainer's flags give it (alpha defaults to the rank: scale 1, as diffusers')."""
    return LoraConfig(r=rank, lora_alpha=alpha if alpha is not None else rank, target_modules=target_modules)


def add_lora(model: nn.Module, config: LoraConfig) -> nn.Module:
    """Inject peft LoRA adapters in place (everything else frozen); refuse any the engine cannot clip exactly."""
    if config.use_dora:
        raise UserError(
            "DoRA (use_dora=True) trains a magnitude vector per output feature (lora_magnitude_vector), which "
            "per-example clipping does not cover exactly. Use plain LoRA (use_dora=False)."
        )
    targets = " ".join(sorted(config.target_modules)) if config.target_modules else "(none)"
    try:
        inject_adapter_in_model(config, model)
    except ValueError as error:  # no module matched, or a module type peft cannot adapt
        raise UserError(f"--lora_target_modules {targets}: {str(error).splitlines()[0]}") from None
    try:
        trainable_layers(model)
    except UnsupportedModuleError as error:
        raise UserError(f"--lora_target_modules {targets}: {error}") from None
    return model


def select_trainable(model: nn.Module, mode: str, train_embedders: bool, lora: LoraConfig | None) -> None:
    """Set requires_grad for `mode`: full leaves the model as it is; attention trains every `Attention` module
    (q, k, v, out) and freezes the rest; lora freezes the model and injects adapters. `train_embedders` also trains
    the timestep/class embedders in attention mode (new classes' rows learn only so)."""
    if mode not in TRAINABLE:
        raise ValueError(f"mode must be one of {TRAINABLE}, got {mode!r}")
    if mode == "attention":
        model.requires_grad_(False)
        for module in model.modules():
            if isinstance(module, Attention) or (train_embedders and isinstance(module, EMBEDDERS)):
                module.requires_grad_(True)
    elif mode == "lora":
        model.requires_grad_(False)
        add_lora(model, lora)


def trained_parameters(model: nn.Module, mode: str, fixed: list[FixedRows]) -> TrainedParameters:
    """The count and names of what the DP mechanism trains, the fixed rows subtracted."""
    trained = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    names = {id(p): n for n, p in model.named_parameters()}
    lora = None
    if mode == "lora":
        config = model.peft_config["default"]
        lora = dict(rank=config.r, alpha=config.lora_alpha, target_modules=sorted(config.target_modules))
    return TrainedParameters(
        trainable=mode,
        trained_parameters=sum(p.numel() for _, p in trained) - sum(f.numel() for f in fixed),
        total_parameters=sum(p.numel() for p in model.parameters()),
        trained=_folded([n for n, _ in trained]),
        frozen=_folded([n for n, p in model.named_parameters() if not p.requires_grad]),
        fixed_rows=_folded([names[id(f.param)] for f in fixed]),
        lora=lora,
    )


def save_lora_weights(model: nn.Module, directory: str | Path) -> Path:
    """The adapter as diffusers saves LoRA weights: `pytorch_lora_weights.safetensors`, keys
    `transformer.<module>.lora_A.weight`, the LoraConfig in the file's metadata (what `load_lora_adapter` reads)."""
    config = model.peft_config["default"].to_dict()
    LoraBaseMixin.write_lora_layers(
        state_dict=LoraBaseMixin.pack_weights(get_peft_model_state_dict(model), LORA_PREFIX),
        save_directory=str(directory),
        is_main_process=True,
        weight_name=LORA_WEIGHT_NAME_SAFE,
        save_function=None,
        safe_serialization=True,
        lora_adapter_metadata={f"{LORA_PREFIX}.{k}": v for k, v in config.items()},
    )
    return Path(directory) / LORA_WEIGHT_NAME_SAFE


def load_lora_weights(model: nn.Module, path: str | Path) -> nn.Module:
    """Apply a LoRA file saved by `save_lora_weights` (a folder or the file) to a DiT, with peft alone."""
    path = Path(path)
    if path.is_dir():
        path = path / LORA_WEIGHT_NAME_SAFE
    with safe_open(str(path), framework="pt") as file:
        metadata = json.loads(file.metadata()[LORA_ADAPTER_METADATA_KEY])
    prefix = f"{LORA_PREFIX}."
    config = {k.removeprefix(prefix): v for k, v in metadata.items() if k.startswith(prefix)}
    config = {k: v for k, v in config.items() if k in LoraConfig.__dataclass_fields__}
    inject_adapter_in_model(LoraConfig(**config), model)
    return set_lora_weights(model, path)


def set_lora_weights(model: nn.Module, path: str | Path) -> nn.Module:
    """Copy a `save_lora_weights` file's values into a model that already has the same adapters (resume)."""
    path = Path(path)
    if path.is_dir():
        path = path / LORA_WEIGHT_NAME_SAFE
    prefix = f"{LORA_PREFIX}."
    weights = {k.removeprefix(prefix): v for k, v in load_file(str(path)).items() if k.startswith(prefix)}
    result = set_peft_model_state_dict(model, weights)
    if result.unexpected_keys:
        raise ValueError(f"{path} holds weights this model has no place for: {result.unexpected_keys[:3]}")
    return model


def merge_lora(model: nn.Module) -> nn.Module:
    """Fold every adapter into its base layer (W + scale B A) and remove the adapters: a plain DiT again."""
    for module in model.modules():
        if isinstance(module, BaseTunerLayer):
            module.merge()
    recurse_remove_peft_layers(model)
    del model.peft_config
    return model
