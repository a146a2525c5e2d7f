"""What a run writes besides checkpoints: validation grids, the pipeline folder, the privacy report and model card."""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
from diffusers import DDPMScheduler, DiTPipeline, DPMSolverMultistepScheduler
from PIL import Image, ImageDraw, ImageFont

from .adapters import merge_lora, save_lora_weights
from .generation import generate, public_finisher
from .model import pad_label_table_for_pipeline
from .model_card import base_model_license, model_card
from .pixel_vae import identity_vae


def sampling_scheduler(scheduler: DDPMScheduler, pixel_space: bool) -> DPMSolverMultistepScheduler:
    """DPM-Solver on the training noise schedule: validation samples with it and the saved pipeline uses it.

    In pixel space the predicted clean image is kept in the data range [-1, 1] (thresholding), as DDPM's
    clip_sample does; latents have no such range.
    """
    if pixel_space:
        return DPMSolverMultistepScheduler.from_config(scheduler.config, thresholding=True, sample_max_value=1.0)
    return DPMSolverMultistepScheduler.from_config(scheduler.config)


TILE = 128  # smallest side of a grid tile: small samples are upscaled (nearest) to stay visible
GAP = 4  # white pixels between tiles


def save_grid(images: torch.Tensor, row_names: list[str], path: Path) -> Image.Image:
    """Images (N, C, H, W) in [0, 1], one row per name (N / len(row_names) each), as a labelled PNG grid."""
    n, c, h, w = images.shape
    columns = n // len(row_names)
    scale = max(1, math.ceil(TILE / max(h, w)))
    font = ImageFont.load_default(size=14)
    label_width = max(font.getbbox(name)[2] for name in row_names) + 2 * GAP
    tile_w, tile_h = w * scale + GAP, h * scale + GAP
    grid = Image.new("RGB", (label_width + columns * tile_w, len(row_names) * tile_h + GAP), "white")
    draw = ImageDraw.Draw(grid)
    pixels = (images.cpu().float().clamp(0, 1) * 255).round().byte().permute(0, 2, 3, 1).numpy()  # (N, H, W, C)
    for i, array in enumerate(pixels):
        row, column = divmod(i, columns)
        tile = Image.fromarray(array[..., 0] if c == 1 else array[..., :3]).convert("RGB")
        tile = tile.resize((w * scale, h * scale), Image.NEAREST)
        grid.paste(tile, (label_width + column * tile_w, GAP + row * tile_h))
    for row, name in enumerate(row_names):
        draw.text((GAP, GAP + row * tile_h + h * scale // 2), name, fill="black", font=font, anchor="lm")
    path.parent.mkdir(parents=True, exist_ok=True)
    grid.save(path)
    return grid


def log_validation(args, accelerator, model, ema, scheduler, vae, classes, class_names, null_label, step) -> Path:
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
        finisher=public_finisher(args, class_names) if args.public_finisher_steps else None,
        finisher_steps=args.public_finisher_steps,
    )
    model.train()
    if ema is not None:
        ema.restore(model.parameters())
    path = Path(args.output_dir) / "samples" / f"step-{step:06d}.png"
    save_grid(images, [class_names[c] if class_names else "unconditional" for c in classes], path)
    send_to_trackers(accelerator, images, step)
    return path


def send_to_trackers(accelerator, images: torch.Tensor, step: int) -> None:
    """A validation grid's images (N, C, H, W) in [0, 1] to tensorboard or wandb."""
    for tracker in accelerator.trackers:
        if tracker.name == "tensorboard":
            tracker.writer.add_images("validation", images.numpy(), step, dataformats="NCHW")
        elif tracker.name == "wandb":
            import wandb

            tracker.log({"validation": [wandb.Image(image.permute(1, 2, 0).numpy()) for image in images]}, step=step)


def save_pipeline(args, model, ema, scheduler, vae, dataset, report: dict, grid: Path | None, location: str) -> None:
    """A folder DiTPipeline.from_pretrained loads (class names included), the privacy report and the model card.

    `location` is what the card tells users to load: the Hub repository, or the output folder.

    DiTPipeline does not save the `id2label` it is built with, but it reads `id2label` from model_index.json:
    registering it there makes `DiTPipeline.from_pretrained(out).get_label_ids([name])` work. A pixel-space
    model gets an AutoencoderKL that decodes to its input (dp_utils/training/pixel_vae.py), so it loads the same way.
    A LoRA run saves its adapter (diffusers' LoRA layout), and the merged pipeline only with --save_merged.
    """
    out = Path(args.output_dir)
    if ema is not None:
        ema.copy_to(model.parameters())  # sampling uses the EMA weights
    lora = report["trainable"] == "lora"
    if lora:
        save_lora_weights(model, out)
        merge_lora(model)
    if not lora or args.save_merged:
        pad_label_table_for_pipeline(model, keep_classes=dataset.conditional)
        if vae is None:
            vae = identity_vae(model.config.in_channels)
        id2label = dict(enumerate(dataset.class_names)) if dataset.conditional else None
        pipeline = DiTPipeline(model, vae, sampling_scheduler(scheduler, dataset.pixel_space), id2label=id2label)
        if id2label is not None:
            pipeline.register_to_config(id2label=id2label)  # read back by model.checkpoint_id2label when fine-tuned
        pipeline.save_pretrained(out)
    (out / "privacy_report.json").write_text(json.dumps(report, indent=2))
    card = model_card(
        report,
        base_model=args.pretrained_model_name_or_path,
        class_names=dataset.class_names if dataset.conditional else None,
        grid=grid.relative_to(out).as_posix() if grid is not None else None,
        license=base_model_license(args.pretrained_model_name_or_path, args.revision, args.cache_dir),
        location=location,
    )
    card.save(out / "README.md")
