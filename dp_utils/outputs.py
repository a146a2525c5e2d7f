"""What a run writes besides checkpoints: validation grids, the pipeline folder, the privacy report and model card."""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
from diffusers import DDPMScheduler, DiTPipeline, DPMSolverMultistepScheduler
from PIL import Image

from .adapters import merge_lora, save_lora_weights
from .generation import generate
from .model import pad_label_table_for_pipeline


def sampling_scheduler(scheduler: DDPMScheduler, pixel_space: bool) -> DPMSolverMultistepScheduler:
    """DPM-Solver on the training noise schedule: validation samples with it and the saved pipeline uses it.

    In pixel space the predicted clean image is kept in the data range [-1, 1] (thresholding), as DDPM's
    clip_sample does; latents have no such range.
    """
    if pixel_space:
        return DPMSolverMultistepScheduler.from_config(scheduler.config, thresholding=True, sample_max_value=1.0)
    return DPMSolverMultistepScheduler.from_config(scheduler.config)


def save_grid(images: torch.Tensor, path: Path, columns: int = 8) -> Image.Image:
    """Images (N, C, H, W) in [0, 1] as one PNG grid."""
    n, c, h, w = images.shape
    rows = math.ceil(n / columns)
    grid = torch.ones(c, rows * h, columns * w)
    for i, image in enumerate(images.cpu()):
        grid[:, (i // columns) * h : (i // columns + 1) * h, (i % columns) * w : (i % columns + 1) * w] = image
    array = (grid.permute(1, 2, 0) * 255).round().byte().numpy()
    picture = Image.fromarray(array[..., 0] if c == 1 else array[..., :3])
    path.parent.mkdir(parents=True, exist_ok=True)
    picture.save(path)
    return picture


def log_validation(args, accelerator, model, ema, scheduler, vae, classes, null_label, step) -> None:
    """A sample grid with the EMA weights, saved as PNG and sent to the trackers."""
    if ema is not None:
        ema.store(model.parameters())
        ema.copy_to(model.parameters())
    model.eval()
    generator = torch.Generator().manual_seed(args.seed)
    labels = [c for c in classes for _ in range(args.num_validation_images)]
    guidance = args.guidance_scale if classes != [null_label] else 1.0  # unconditional: nothing to guide
    images = generate(
        model,
        sampling_scheduler(scheduler, pixel_space=vae is None),
        labels,
        null_label,
        guidance,
        args.num_inference_steps,
        vae=vae,
        generator=generator,
    )
    model.train()
    if ema is not None:
        ema.restore(model.parameters())
    save_grid(images, Path(args.output_dir) / "samples" / f"step-{step:06d}.png", columns=args.num_validation_images)
    for tracker in accelerator.trackers:
        if tracker.name == "tensorboard":
            tracker.writer.add_images("validation", images.numpy(), step, dataformats="NCHW")
        elif tracker.name == "wandb":
            import wandb

            tracker.log({"validation": [wandb.Image(image.permute(1, 2, 0).numpy()) for image in images]}, step=step)


def save_pipeline(args, model, ema, scheduler, vae, dataset, report) -> None:
    """A folder DiTPipeline.from_pretrained loads, the privacy report and a model card stating the guarantee."""
    out = Path(args.output_dir)
    if ema is not None:
        ema.copy_to(model.parameters())  # sampling uses the EMA weights
    if report["trainable"] == "lora":
        save_lora_weights(model, out)
        merge_lora(model)
    if report["trainable"] != "lora" or args.save_merged:
        pad_label_table_for_pipeline(model)
        id2label = dict(enumerate(dataset.class_names)) if dataset.conditional else None
        if id2label is not None:
            model.register_to_config(id2label=id2label)  # read back by model.checkpoint_id2label when fine-tuned
        if vae is not None:
            DiTPipeline(
                transformer=model,
                vae=vae,
                scheduler=sampling_scheduler(scheduler, pixel_space=False),
                id2label=id2label,
            ).save_pretrained(out)
        else:  # pixel space: no VAE to decode with; the transformer and scheduler are the model
            model.save_pretrained(out / "transformer")
            sampling_scheduler(scheduler, pixel_space=True).save_pretrained(out / "scheduler")
    (out / "privacy_report.json").write_text(json.dumps(report, indent=2))
    (out / "README.md").write_text(model_card(report))


def model_card(report: dict) -> str:
    """The README.md of a trained model: the guarantee, how it was trained, and the full privacy report."""
    if report["epsilon"] is None:
        guarantee = "**no privacy guarantee**: it was trained without noise (the non-private baseline)."
    else:
        guarantee = (
            f"**({report['epsilon']:.3g}, {report['delta']:.3g})-differential privacy** with respect to the addition "
            "or removal of **one training image** (one row of the latent cache, its mirrored view included)."
        )
        if report["weak_delta_accepted"]:
            guarantee += (
                f" **A weak guarantee**: delta is at least 1/N = 1/{report['dataset_size']} (accepted with "
                "`--accept_weak_delta`); a mechanism that publishes one training image in full meets such a delta."
            )
    return (
        f"# DiT fine-tuned with DP-SGD\n\nTrained by `train_dp_dit.py` with {guarantee}\n\n"
        f"{report['steps']} steps of Poisson sampling at rate {report['sample_rate']:.4g} on "
        f"{report['dataset_size']} images, noise multiplier {report['noise_multiplier']:.4g}, clipping norm "
        f"{report['max_grad_norm']} ({report['accountant']} accountant). {_trained_note(report)}"
        "The guarantee covers the training images, not the data of a pretrained checkpoint.\n\n"
        f"```json\n{json.dumps(report, indent=2)}\n```\n"
    )


def _trained_note(report: dict) -> str:
    """What was trained; for a LoRA run, how to load the adapter (DiTPipeline has no LoRA loader of its own)."""
    trained = f"{report['trainable']}: {', '.join(report['trained'])}" if report["frozen"] else "every parameter"
    text = f"Trained: {report['trained_parameters']:,} of {report['total_parameters']:,} parameters ({trained})"
    if report["fixed_rows"]:
        text += f", the variance rows of {', '.join(report['fixed_rows'])} kept as loaded"
    text += ". "
    if report["trainable"] != "lora":
        return text
    return text + (
        f"The LoRA adapter (rank {report['lora']['rank']}, alpha {report['lora']['alpha']:g}) is in "
        "`pytorch_lora_weights.safetensors`, diffusers' LoRA layout, for the transformer of the checkpoint it was "
        "trained from: `dp_utils.adapters.load_lora_weights(pipeline.transformer, folder)`, or diffusers' "
        "`load_lora_adapter(folder, prefix='transformer', weight_name='pytorch_lora_weights.safetensors')` on a "
        "transformer class with `PeftAdapterMixin`. "
    )
