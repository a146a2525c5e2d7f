"""See before training why a model is fast, slow or refused under per-example clipping.

    python -m dp_utils.inspect --model_config DiT-XL/2 --resolution 256 --batch_size 32
    python -m dp_utils.inspect --pretrained_model_name_or_path facebook/DiT-XL-2-256 --trainable lora
    python -m dp_utils.inspect --model_config DiT-S/2 --all_layers --json report.json

For every trainable layer: its parameters, how often it runs per forward (DiT's first block's timestep/class embedder
runs twice: once in the block, once for the final layer's modulation), the per-example norm method the clipping
engine picks (ghost norm, rank-one, or per-example instantiation) and its cost in FLOPs and bytes at the batch and
token count given; what is frozen; totals; and the modules the engine refuses, with the fix. The model is built on
the meta device from its config: nothing is downloaded or allocated, DiT-XL/2 included.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
from collections import Counter
from dataclasses import asdict, dataclass, field

import diffusers
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from .clipping.engine import UnsupportedModuleError, trainable_layers
from .clipping.freezing import freeze_embedders
from .errors import UserError, run_script
from .training.adapters import LORA_TARGET_MODULES, TRAINABLE, fold_block_index, lora_config, select_trainable
from .training.model import PRESETS, dit_from_preset

GRAM_BYTES = 4  # the engine's Gram matrices and instantiated gradients accumulate in at least fp32


@dataclass
class Layer:
    """One module owning parameters, as the engine sees it in one forward."""

    name: str
    kind: str  # the module's class
    trainable: int  # trainable parameters it owns
    frozen: int  # frozen parameters it owns
    calls: int = 0  # calls per forward
    tokens: int = 0  # rows of its per-example (tokens, features) input, over all calls
    method: str = "frozen"  # ghost, rank-one, instantiate, index-gram or refused
    norm_gflop: float = 0.0  # the per-example norms of one batch
    norm_mib: float = 0.0  # what the norm computation allocates (Gram matrices or per-example gradients)
    kept_mib: float = 0.0  # the output gradients flash_bk keeps until the clip factors are known


@dataclass
class Report:
    batch_size: int
    resolution: int
    trainable_mode: str
    layers: list[Layer]
    total_parameters: int  # of the model, sum(p.numel() for p in model.parameters())
    forward_gflop: float  # matmul FLOPs of the forward at this batch (torch's flop counter)
    blocks: int
    unsupported: list[str] = field(default_factory=list)  # the engine's refusals, each naming the module and fix

    @property
    def trainable(self) -> int:
        return sum(layer.trainable for layer in self.layers)

    @property
    def frozen(self) -> int:
        return sum(layer.frozen for layer in self.layers)


def norm_method(kind: str, tokens: int, d: int, p: int, weight_trainable: bool) -> str:
    """The norm method of a layer with `tokens` rows per example of d inputs and p outputs.

    Mirrors `weight_and_bias_norm` in dp_utils/clipping/rules/linear.py (nn.Linear, and nn.Conv2d over patches):
    one token is rank one, ghost when T (d + p) < d p, else instantiation; embeddings use the same-index Gram of
    their output gradients (rules/embedding.py), affine norms instantiate (rules/norm.py).
    """
    if kind in ("Linear", "Conv2d"):
        if tokens == 1:
            return "rank-one"
        if weight_trainable and tokens * (d + p) < d * p:
            return "ghost"
        return "instantiate"
    if kind == "Embedding":
        return "index-gram"
    return "instantiate"


def norm_cost(method: str, batch: int, tokens: int, d: int, p: int, shared_input: bool = False) -> tuple[float, float]:
    """(FLOPs, bytes) of one batch's per-example norms by `method`; `shared_input`: the input Gram is another
    layer's (q, k and v read one tensor; `RowGroups.shared`)."""
    if method == "ghost":
        grams = (0 if shared_input else 1) + 1
        return 2.0 * batch * tokens**2 * ((0 if shared_input else d) + p + 1), grams * GRAM_BYTES * batch * tokens**2
    if method == "rank-one":
        return 2.0 * batch * (d + p), 2 * GRAM_BYTES * batch
    if method == "index-gram":
        return 2.0 * batch * tokens**2 * p, (GRAM_BYTES + 1) * batch * tokens**2
    return 2.0 * batch * tokens * d * p, GRAM_BYTES * batch * d * p  # instantiate: the (p, d) gradient per example


def _features(module: nn.Module, x: torch.Tensor, out: torch.Tensor) -> tuple[int, int, int]:
    """(tokens per example, d, p) of one call, as the engine's rule flattens it."""
    b = x.shape[0]
    if isinstance(module, nn.Conv2d):  # unfolded patches
        kh, kw = module.kernel_size
        return out[0, 0].numel(), module.in_channels * kh * kw, module.out_channels
    if isinstance(module, nn.Embedding):
        return x.numel() // b, module.num_embeddings, module.embedding_dim
    if isinstance(module, nn.Linear):
        return x.numel() // (b * module.in_features), module.in_features, module.out_features
    params = list(module.parameters(recurse=False))  # affine norms: (B, n) per-example gradients per parameter
    n = params[0].numel()
    return x.numel() // (b * n), n, sum(p.requires_grad for p in params)


def _record_calls(model: nn.Module, inputs: dict) -> tuple[dict[nn.Module, list], float]:
    """Forward `inputs` once; per parameter-owning module, its calls as (tokens, d, p, input tensor); matmul GFLOP."""
    calls: dict[nn.Module, list] = {}

    def hook(module, args, out):
        if args and isinstance(args[0], torch.Tensor) and isinstance(out, torch.Tensor):
            calls.setdefault(module, []).append((*_features(module, args[0], out), args[0]))

    owners = [m for m in model.modules() if any(True for _ in m.parameters(recurse=False))]
    handles = [m.register_forward_hook(hook) for m in owners]
    try:
        with torch.no_grad(), FlopCounterMode(display=False) as flops:
            model(**inputs)
    finally:
        for handle in handles:
            handle.remove()
    return calls, flops.get_total_flops() / 1e9


def unsupported_modules(model: nn.Module) -> list[str]:
    """Every refusal of the clipping engine (`trainable_layers`), each module frozen in turn to find the next.

    Freezes the refused modules of `model` (the inspector's own meta copy).
    """
    refusals = []
    while True:
        try:
            trainable_layers(model)
            return refusals
        except UnsupportedModuleError as error:
            refusals.append(str(error))
            match = re.match(r"(?:Module|Parameter) '([^']*?)(?:\.weight|\.bias)?'", str(error))
            name = match.group(1) if match else None
            if name is None or name == "<root module>":  # nothing to freeze by name: report what we have
                return refusals
            target = model.get_submodule(name) if name in dict(model.named_modules()) else None
            if target is None:
                return refusals
            for p in target.parameters(recurse=False):
                p.requires_grad_(False)


def inspect_model(model: nn.Module, inputs: dict, resolution: int, trainable_mode: str, bf16: bool) -> Report:
    """The report of `model` (any device, meta included) on one forward of `inputs` (batch first)."""
    batch = next(iter(inputs.values())).shape[0]
    layers = {
        m: Layer(
            name,
            type(m).__name__,
            sum(p.numel() for p in m.parameters(recurse=False) if p.requires_grad),
            sum(p.numel() for p in m.parameters(recurse=False) if not p.requires_grad),
        )
        for name, m in model.named_modules()
        if any(True for _ in m.parameters(recurse=False))
    }
    refusals = unsupported_modules(model)
    still = {m for m in layers if any(p.requires_grad for p in m.parameters(recurse=False))}
    refused = {m for m, layer in layers.items() if layer.trainable and m not in still}
    calls, forward_gflop = _record_calls(model, inputs)
    grad_bytes = 2 if bf16 else 4
    gram_of: set[int] = set()  # inputs whose Gram a ghost layer computed already
    for module, layer in layers.items():
        module_calls = calls.get(module, [])
        layer.calls = len(module_calls)
        if module in refused:
            layer.method = "refused"
        if not layer.trainable or not module_calls or module in refused:
            continue
        tokens = sum(c[0] for c in module_calls)
        _, d, p, x = module_calls[0]
        weight = getattr(module, "weight", None)
        weight_trainable = weight is not None and weight.requires_grad
        layer.tokens = tokens
        layer.method = norm_method(layer.kind, tokens, d, p, weight_trainable)
        d = d if weight_trainable or layer.kind not in ("Linear", "Conv2d") else 0  # a trainable bias alone: sums
        shared = layer.method == "ghost" and len(module_calls) == 1 and id(x) in gram_of
        if layer.method == "ghost" and len(module_calls) == 1:
            gram_of.add(id(x))
        flops, nbytes = norm_cost(layer.method, batch, tokens, d, p, shared)
        layer.norm_gflop, layer.norm_mib = flops / 1e9, nbytes / 2**20
        layer.kept_mib = batch * tokens * p * grad_bytes / 2**20
    del calls  # the recorded inputs were kept alive only so that their ids stay unique
    blocks = len(getattr(model, "transformer_blocks", []))
    total = sum(p.numel() for p in model.parameters())
    return Report(batch, resolution, trainable_mode, list(layers.values()), total, forward_gflop, blocks, refusals)


def build_model(args) -> tuple[nn.Module, int]:
    """The model on the meta device from its config alone, with the trainable set applied; and its sample size."""
    if args.pretrained_model_name_or_path:
        config = _load_config(args.pretrained_model_name_or_path)
        model_class = getattr(diffusers, config.get("_class_name", "DiTTransformer2DModel"), None)
        if model_class is None:
            raise UserError(f"{args.pretrained_model_name_or_path}: unknown model class {config['_class_name']!r}.")
        sample_size = args.resolution // 8 if args.resolution else config["sample_size"]
        with torch.device("meta"):
            model = model_class.from_config({**config, "sample_size": sample_size})
    else:
        sample_size = (args.resolution or 256) // 8
        with torch.device("meta"):
            model = dit_from_preset(args.model_config, in_channels=4, sample_size=sample_size, num_classes=1000)
    embedders = args.embedders or ("train" if args.trainable == "full" else "freeze")  # the trainer's default
    lora = lora_config(args.lora_rank, None, args.lora_target_modules) if args.trainable == "lora" else None
    select_trainable(model, args.trainable, train_embedders=embedders == "train", lora=lora)
    if embedders == "freeze":
        freeze_embedders(model)
    return model, sample_size


def _load_config(path: str) -> dict:
    """The transformer's config of a pipeline folder or Hub id (its transformer/ subfolder), or of a model folder."""
    for subfolder in ("transformer", None):
        try:
            return dict(diffusers.DiTTransformer2DModel.load_config(path, subfolder=subfolder))
        except (OSError, ValueError):
            continue
    raise UserError(f"--pretrained_model_name_or_path {path}: no config.json there (nor in its transformer/ folder).")


def dit_inputs(model: nn.Module, batch: int, sample_size: int) -> dict:
    """A DiT forward's keyword inputs at this batch and latent size, on the model's device."""
    device = next(model.parameters()).device
    channels = model.config.in_channels
    labels = torch.zeros(batch, dtype=torch.long, device=device)
    return dict(
        hidden_states=torch.zeros(batch, channels, sample_size, sample_size, device=device),
        timestep=labels,
        class_labels=labels,
    )


def fold_layers(layers: list[Layer]) -> list[tuple[Layer, int]]:
    """Layers of identical shape and cost in different blocks as one row (`transformer_blocks.*.`) and a count."""
    rows: dict[tuple, list] = {}
    for layer in layers:
        name = fold_block_index(layer.name)
        key = (name, layer.kind, layer.trainable, layer.frozen, layer.calls, layer.tokens, layer.method)
        if key in rows:
            rows[key][0].name, rows[key][1] = name, rows[key][1] + 1
        else:
            rows[key] = [Layer(**asdict(layer)), 1]  # one layer keeps its own name
    return [(layer, n) for layer, n in rows.values()]


def _reused(layers: list[Layer]) -> str:
    """The layers called more than once per forward, under their common parent (DiT: block 0's embedder)."""
    reused = [layer for layer in layers if layer.calls > 1]
    if not reused:
        return "none"
    parts = [layer.name.split(".") for layer in reused]
    parent = ".".join(os.path.commonprefix(parts))
    calls = sorted({layer.calls for layer in reused})
    return f"{parent or '<model>'} ({len(reused)} layers, {'/'.join(map(str, calls))} calls per forward)"


def format_report(report: Report, all_layers: bool = False) -> str:
    rows = [(layer, 1) for layer in report.layers] if all_layers else fold_layers(report.layers)
    lines = [
        f"batch {report.batch_size}, {report.resolution}px, trainable: {report.trainable_mode}, "
        f"{report.blocks} transformer blocks",
        f"{'layer':<62} {'type':<10} {'x':>3} {'params':>11} {'calls':>5} {'tokens':>6} {'method':<11} "
        f"{'norm GFLOP':>10} {'norm MiB':>9} {'kept MiB':>9}",
    ]
    for layer, n in rows:
        if not layer.trainable:
            continue
        lines.append(
            f"{layer.name:<62} {layer.kind:<10} {n:>3} {layer.trainable:>11,} {layer.calls:>5} {layer.tokens:>6} "
            f"{layer.method:<11} {layer.norm_gflop:>10.3f} {layer.norm_mib:>9.2f} {layer.kept_mib:>9.2f}"
        )
    frozen: dict[str, list[int]] = {}  # folded name -> [layers, parameters]
    for layer in report.layers:
        if layer.frozen:
            entry = frozen.setdefault(layer.name if all_layers else fold_block_index(layer.name), [0, 0])
            entry[0], entry[1] = entry[0] + 1, entry[1] + layer.frozen
    if frozen:
        lines.append("frozen: " + ", ".join(f"{name} (x{n}, {count:,})" for name, (n, count) in frozen.items()))
    trained = [layer for layer in report.layers if layer.trainable and layer.method != "refused"]
    norm_gflop = sum(layer.norm_gflop for layer in trained)
    methods = Counter(layer.method for layer in trained)
    lines += [
        f"parameters: {report.trainable:,} trainable + {report.frozen:,} frozen = {report.total_parameters:,}",
        f"reused modules: {_reused(report.layers)}",
        "norm methods: " + ", ".join(f"{n} {m}" for m, n in methods.items()) + f", {len(trained)} layers",
        f"per-example norms: {norm_gflop:.1f} GFLOP, {norm_gflop / (3 * report.forward_gflop):.1%} of a training "
        f"step's matmuls ({3 * report.forward_gflop:.1f} GFLOP: forward x 3)",
        f"engine memory: largest norm buffer {max((layer.norm_mib for layer in trained), default=0):.1f} MiB; "
        f"flash_bk keeps {sum(layer.kept_mib for layer in trained):.1f} MiB of output gradients until the clip "
        "factors are known",
    ]
    lines += [f"unsupported: {message}" for message in report.unsupported]
    return "\n".join(lines)


def main(args) -> int:
    model, sample_size = build_model(args)
    report = inspect_model(
        model, dit_inputs(model, args.batch_size, sample_size), sample_size * 8, args.trainable, args.bf16
    )
    print(format_report(report, args.all_layers))
    if args.json:
        with open(args.json, "w") as file:
            json.dump({**asdict(report), "trainable": report.trainable, "frozen": report.frozen}, file, indent=1)
    return 1 if report.unsupported else 0


def parse_args(input_args=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--pretrained_model_name_or_path", help="Pipeline or transformer folder (or cached Hub id).")
    source.add_argument("--model_config", choices=PRESETS, help="A DiT paper preset (4 channels, 1000 classes).")
    parser.add_argument("--trainable", choices=TRAINABLE, default="full", help="What DP-SGD trains. Default: full.")
    parser.add_argument(
        "--embedders",
        choices=["train", "freeze"],
        help="Train or freeze the timestep/class embedders. Default: as the trainer (train with full, else freeze).",
    )
    parser.add_argument("--lora_rank", type=int, default=4, help="LoRA rank. Default: 4 (the trainer's).")
    parser.add_argument("--lora_target_modules", nargs="+", default=LORA_TARGET_MODULES, help="LoRA targets.")
    parser.add_argument("--batch_size", type=int, default=32, help="Physical batch. Default: 32.")
    parser.add_argument(
        "--resolution", type=int, help="Image side in pixels (latent side x 8). Default: the config's, or 256."
    )
    parser.add_argument("--bf16", action="store_true", help="Output gradients kept in bf16 (autocast).")
    parser.add_argument("--all_layers", action="store_true", help="One row per layer (default: blocks folded).")
    parser.add_argument("--json", help="Also write the report, every layer, to this JSON file.")
    args = parser.parse_args(input_args)
    if args.batch_size < 1 or (args.resolution is not None and (args.resolution < 16 or args.resolution % 16)):
        parser.error("--batch_size must be >= 1 and --resolution a multiple of 16")
    return args


if __name__ == "__main__":
    sys.exit(run_script(lambda: main(parse_args())))
