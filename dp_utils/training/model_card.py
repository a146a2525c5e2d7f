"""The model card (README.md) of a trained model: Hub metadata, the guarantee, the classes, how to sample."""

from __future__ import annotations

import json
from pathlib import Path

from huggingface_hub import ModelCard, ModelCardData, hf_hub_download

from .recipe import describe_recipe
from .released import guarantee_notes

DP_TAGS = ["differential-privacy", "dp-sgd"]
TAGS = ["dit", "diffusers", "class-conditional-image-generation"]


def base_model_license(base_model: str | None, revision: str | None = None, cache_dir: str | None = None) -> str:
    """The license in the base model's card (a local folder's README.md, or the Hub's), else "other"."""
    if base_model is None:
        return "other"
    try:
        readme = Path(base_model) / "README.md"
        if not Path(base_model).is_dir():
            readme = hf_hub_download(base_model, "README.md", revision=revision, cache_dir=cache_dir)
        return ModelCard.load(readme).data.license or "other"
    except Exception:  # no card, no network: the license is for the user to fill in
        return "other"


def _guarantee(report: dict) -> str:
    if report["epsilon"] is None:
        return (
            "It has **no privacy guarantee**: it was trained without noise, as the non-private baseline of a DP run "
            "(same batches and clipping code, noise multiplier 0)."
        )
    text = (
        f"It satisfies **({report['epsilon']:.3g}, {report['delta']:.3g})-differential privacy** with respect to "
        "the addition or removal of **one training image** (one row of the latent cache, its mirrored view "
        "included)."
    )
    if report["weak_delta_accepted"]:
        text += (
            f" **A weak guarantee**: delta is at least 1/N = 1/{report['dataset_size']} (accepted with "
            "`--accept_weak_delta`); a mechanism that publishes one training image in full meets such a delta."
        )
    return text


def _trained_note(report: dict) -> str:
    """What was trained; for a LoRA run, how to load the adapter (DiTPipeline has no LoRA loader of its own)."""
    trained = f"{report['trainable']}: {', '.join(report['trained'])}" if report["frozen"] else "every parameter"
    text = f"Trained: {report['trained_parameters']:,} of {report['total_parameters']:,} parameters ({trained})"
    if report["fixed_rows"]:
        text += f", the variance rows of {', '.join(report['fixed_rows'])} kept as loaded"
    text += "."
    if report["trainable"] != "lora":
        return text
    return text + (
        f" The LoRA adapter (rank {report['lora']['rank']}, alpha {report['lora']['alpha']:g}) is in "
        "`pytorch_lora_weights.safetensors`, diffusers' LoRA layout, for the transformer of the checkpoint it was "
        "trained from: `dp_utils.training.adapters.load_lora_weights(pipe.transformer, folder)`, or diffusers' "
        "`load_lora_adapter(folder, prefix='transformer', weight_name='pytorch_lora_weights.safetensors')` on a "
        "transformer class with `PeftAdapterMixin`."
    )


def model_card(
    report: dict,
    base_model: str | None,
    class_names: list[str] | None,
    grid: str | None,
    license: str,
    location: str,
) -> ModelCard:
    """A ModelCard with YAML metadata (license, base_model, tags) and the guarantee, classes, samples and report.

    `grid` is the path of a sample grid relative to the card; `location` is what `from_pretrained` is given.
    """
    private = report["epsilon"] is not None
    data = ModelCardData(
        license=license,
        base_model=base_model,
        library_name="diffusers",
        tags=(DP_TAGS if private else ["non-private-baseline"]) + TAGS,
    )
    how = "with DP-SGD" if private else "without privacy (non-private baseline)"
    title = f"{base_model} fine-tuned {how}" if base_model else f"DiT trained from scratch {how}"
    origin = "Trained from a random initialisation (no base model)"
    if base_model:
        link = base_model if Path(base_model).is_dir() else f"https://huggingface.co/{base_model}"
        origin = f"Fine-tuned from [`{base_model}`]({link})"
    if class_names:
        classes = f"{len(class_names)} classes (id: name): " + ", ".join(
            f"{i}: `{name}`" for i, name in enumerate(class_names)
        )
        labels = f"pipe.get_label_ids([{class_names[0]!r}])"
    else:
        classes = "Unconditional: trained on the null class only, id 1000 in DiTPipeline (sample without guidance)."
        labels = "[1000]"
    guidance = 4.0 if class_names else 1.0
    sections = [
        f"# {title}",
        f"{origin} by `train_dp_dit.py` (dp-dit) on {report['dataset_size']} images. {_guarantee(report)}",
        f"## Classes\n\n{classes}",
        "## Usage\n\n```python\nfrom diffusers import DiTPipeline\n\n"
        f"pipe = DiTPipeline.from_pretrained({location!r})\n"
        f"images = pipe(class_labels={labels}, num_inference_steps=25, guidance_scale={guidance}).images\n```\n\n"
        "Ids beyond the classes act as the unconditional (null) class: DiTPipeline's table has 1000 class rows.",
    ]
    if grid:
        sections.append(f"## Samples\n\n![Samples, one row per class]({grid})")
    training = (
        f"{report['steps']} steps of Poisson sampling at rate {report['sample_rate']:.4g} (expected batch "
        f"{report['expected_batch_size']:.1f}), noise multiplier {report['noise_multiplier']:.4g}, clipping norm "
        f"{report['max_grad_norm']}, {report['accountant']} accountant. {_trained_note(report)}"
    )
    if describe_recipe(report):
        training += " " + describe_recipe(report)
    if private and base_model:
        training += " The guarantee covers the training images, not the data the base model was trained on."
    if private:
        sections.append("## What the guarantee covers\n\n" + "\n\n".join(guarantee_notes(report)))
    sections += [f"## Training\n\n{training}", f"## Privacy report\n\n```json\n{json.dumps(report, indent=2)}\n```"]
    return ModelCard(f"---\n{data.to_yaml()}\n---\n\n" + "\n\n".join(sections) + "\n")
