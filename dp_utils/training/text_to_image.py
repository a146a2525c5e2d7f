"""Text-to-image DiTs in train_dp_dit.py: PixArt-alpha/Sigma (`PixArtTransformer2DModel`) and SD3/3.5
(`SD3Transformer2DModel`) over a cache with captions (`dp_utils.data.captions`).

What differs from class-conditional DiT, as diffusers' own training scripts for these models do it:
- conditioning: each row's caption encoding (prompt embeddings; PixArt's mask, SD3's pooled embeddings); caption
  dropout puts the empty caption's encoding in its place (--proportion_empty_prompts), one draw per image;
- PixArt trains as DiT does (DDPM noise prediction on the first C of its learned-sigma output channels);
  SD3 by flow matching: sigma from a logit-normal timestep density (mean 0, std 1, diffusers' default), input
  (1 - sigma) x + sigma noise, target noise - x, no loss weighting; each image's loss is one entry of a (B,) tensor;
- validation samples --validation_prompts with the pipeline, and the output folder is that pipeline
  (`PixArtSigmaPipeline` / `StableDiffusion3Pipeline.from_pretrained`), or the LoRA adapter in diffusers' layout.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from diffusers import (
    AutoencoderKL,
    DDPMScheduler,
    DiffusionPipeline,
    FlowMatchEulerDiscreteScheduler,
    PixArtTransformer2DModel,
    SD3Transformer2DModel,
)
from huggingface_hub import ModelCard, ModelCardData

import dp_utils

from ..data.captions import CAPTION_PIPELINES, CaptionedLatents
from ..errors import UserError
from .adapters import merge_lora, save_lora_weights
from .batches import PhysicalBatchDataset, PhysicalBatchKey
from .model_card import DP_TAGS, _guarantee, _trained_note, base_model_license
from .outputs import save_grid, send_to_trackers
from .pretrained import from_pretrained
from .released import guarantee_notes


def is_text_to_image(info: dict) -> bool:
    """Whether a cache's metadata says it holds captions."""
    return bool(info.get("captions"))


def open_text_to_image(args, info: dict):
    """The transformer, its training scheduler, the cache's VAE and the captioned cache, checked together."""
    path, flag = args.pretrained_model_name_or_path, "--pretrained_model_name_or_path"
    if not path:
        raise UserError(
            "A cache with captions trains a text-to-image pipeline: give --pretrained_model_name_or_path (a "
            "PixArt-alpha/Sigma or SD3 pipeline), not --model_config."
        )
    if args.validation_steps and not args.validation_prompts:
        raise UserError("--validation_steps on a cache with captions samples --validation_prompts: give some.")
    hub = dict(revision=args.revision, cache_dir=args.cache_dir)
    pipeline_class = DiffusionPipeline.load_config(path, **hub)["_class_name"]
    encoded_by = info["captions"]["pipeline"]
    if pipeline_class not in CAPTION_PIPELINES or pipeline_class != encoded_by:
        raise UserError(
            f"{flag} {path} is a {pipeline_class}, but the cache's captions were encoded by a {encoded_by}'s text "
            "encoders: train the pipeline whose encoders made the cache."
        )
    pixart = pipeline_class.startswith("PixArt")
    model_class = PixArtTransformer2DModel if pixart else SD3Transformer2DModel
    model = from_pretrained(model_class, path, flag, subfolder="transformer", variant=args.variant, **hub)
    scheduler_class = DDPMScheduler if pixart else FlowMatchEulerDiscreteScheduler  # PixArt's DPM-Solver betas
    scheduler = from_pretrained(scheduler_class, path, flag, subfolder="scheduler", **hub)
    vae = from_pretrained(AutoencoderKL, info["vae"], "The cache's VAE", subfolder=info.get("vae_subfolder"), **hub)
    channels, height, width = info["latent_shape"]
    patch = model.config.patch_size
    if channels != model.config.in_channels or height % patch or width % patch:
        raise UserError(
            f"The cache holds latents of shape {info['latent_shape']}, but {path}'s transformer takes "
            f"{model.config.in_channels} channels in patches of {patch}: re-create the cache with this pipeline's VAE "
            "and a --resolution it can patch."
        )
    dataset = CaptionedLatents(args.latent_cache, random_flip=not args.no_flip)
    if args.max_train_samples is not None and args.max_train_samples < len(dataset):
        dataset.select_random_rows(args.max_train_samples, args.seed)
    return model, scheduler, vae, dataset, None


@dataclass
class CaptionedBatch:
    """A physical batch of a captioned cache; dropped captions already replaced by the empty caption's encoding."""

    step: int
    last: bool
    latents: torch.Tensor  # (B, C, H, W)
    prompt_embeds: torch.Tensor  # (B, T, D), padded with zeros
    prompt_mask: torch.Tensor  # (B, T), 1 for a caption's tokens
    pooled: torch.Tensor | None  # (B, P), SD3

    def pin_memory(self) -> CaptionedBatch:
        pooled = None if self.pooled is None else self.pooled.pin_memory()
        tensors = (self.latents, self.prompt_embeds, self.prompt_mask)
        return CaptionedBatch(self.step, self.last, *(t.pin_memory() for t in tensors), pooled)


class CaptionedBatchDataset(PhysicalBatchDataset):
    """PhysicalBatchDataset's physical batches (same per-batch generator) of a captioned cache, with caption
    dropout; not padded (prompt lengths vary from batch to batch)."""

    def __init__(self, dataset: CaptionedLatents, proportion_empty_prompts: float, seed: int, rank: int):
        super().__init__(dataset, proportion_empty_prompts, None, seed, rank)

    def __getitem__(self, key: PhysicalBatchKey) -> CaptionedBatch:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self._seed(key))
            rows = [self.dataset[row] for row in key.rows]
            drop = (torch.rand(len(rows)) < self.class_dropout_prob).tolist()
        empty = self.dataset.empty_prompt
        rows = [(x, *empty) if dropped else (x, e, p) for (x, e, p), dropped in zip(rows, drop, strict=True)]
        return CaptionedBatch(key.step, key.last, *collate(rows, self.dataset.latent_shape, empty))


def collate(rows: list, latent_shape: tuple, empty: tuple) -> tuple:
    """Latents, prompt embeddings padded to the longest, their mask, and pooled embeddings (or None)."""
    length = max((e.shape[0] for _, e, _ in rows), default=empty[0].shape[0])
    embeds = torch.zeros(len(rows), length, empty[0].shape[1])
    mask = torch.zeros(len(rows), length, dtype=torch.long)
    for i, (_, e, _) in enumerate(rows):
        embeds[i, : len(e)], mask[i, : len(e)] = e, 1
    latents = torch.stack([x for x, _, _ in rows]) if rows else torch.zeros(0, *latent_shape)
    pooled = None
    if empty[1] is not None:
        pooled = torch.stack([p.float() for _, _, p in rows]) if rows else torch.zeros(0, empty[1].shape[0])
    return latents, embeds, mask, pooled


def captioned_batch_loss(args, accelerator, run, batch: CaptionedBatch) -> dp_utils.DPLoss:
    """Per-row losses (B*K,) of a captioned physical batch: K noise and timestep draws per image, clipped as one."""
    k, device = args.noise_multiplicity, accelerator.device
    latents, embeds, mask = (
        t.to(device).repeat_interleave(k, 0) for t in (batch.latents, batch.prompt_embeds, batch.prompt_mask)
    )
    noise = torch.randn_like(latents)
    if isinstance(run.transformer, SD3Transformer2DModel):
        pooled = batch.pooled.to(device).repeat_interleave(k, 0)
        scheduler = run.scheduler
        u = torch.sigmoid(torch.randn(len(latents), device=device))  # logit-normal(0, 1)
        index = (u * scheduler.config.num_train_timesteps).long().clamp(max=len(scheduler.timesteps) - 1).cpu()
        timesteps, sigmas = scheduler.timesteps[index].to(device), scheduler.sigmas[index].to(device)
        sigma = sigmas.view(-1, 1, 1, 1)
        noisy, target = (1 - sigma) * latents + sigma * noise, noise - latents
        with accelerator.autocast():
            prediction = run.model(
                hidden_states=noisy, timestep=timesteps, encoder_hidden_states=embeds, pooled_projections=pooled
            ).sample
        return run.criterion(prediction, target)
    timesteps = torch.randint(0, run.scheduler.config.num_train_timesteps, (len(latents),), device=device)
    noisy = run.scheduler.add_noise(latents, noise, timesteps)
    target = noise
    if run.scheduler.config.prediction_type == "v_prediction":
        target = run.scheduler.get_velocity(latents, noise, timesteps)
    with accelerator.autocast():
        prediction = run.model(
            noisy,
            encoder_hidden_states=embeds,
            encoder_attention_mask=mask,
            timestep=timesteps,
            added_cond_kwargs=_pixart_conditions(run, latents),
        ).sample[:, : latents.shape[1]]
    return run.criterion(prediction, target)


def _pixart_conditions(run, latents: torch.Tensor) -> dict:
    """PixArt-alpha 1024's resolution and aspect-ratio conditions (the image size of the cache), else none."""
    if not run.transformer.use_additional_conditions:
        return {"resolution": None, "aspect_ratio": None}
    size = run.dataset.info["resolution"]
    rows = len(latents)
    return {
        "resolution": torch.tensor([[size, size]], device=latents.device, dtype=latents.dtype).repeat(rows, 1),
        "aspect_ratio": torch.ones(rows, 1, device=latents.device, dtype=latents.dtype),
    }


def pipeline_class(run):
    import diffusers

    return getattr(diffusers, run.dataset.info["captions"]["pipeline"])


def load_pipeline(args, run):
    """The pretrained pipeline (its text encoders, tokenizers and scheduler) around the trained transformer."""
    return pipeline_class(run).from_pretrained(
        args.pretrained_model_name_or_path,
        transformer=run.transformer,
        vae=run.vae,
        revision=args.revision,
        cache_dir=args.cache_dir,
    )


@torch.no_grad()
def sample_prompts(args, run, prompts: list[str]) -> torch.Tensor:
    """Images (N, 3, H, W) in [0, 1], args.num_validation_images per prompt, with the EMA weights if any."""
    if run.ema is not None:
        run.ema.store(run.transformer.parameters())
        run.ema.copy_to(run.transformer.parameters())
    run.transformer.eval()
    pipe = load_pipeline(args, run).to(run.transformer.device)
    pipe.set_progress_bar_config(disable=True)
    size = run.dataset.info["resolution"]
    options = (
        {"use_resolution_binning": False} if run.dataset.info["captions"]["pipeline"].startswith("PixArt") else {}
    )
    try:
        images = pipe(
            prompts,
            num_images_per_prompt=args.num_validation_images,
            height=size,
            width=size,
            guidance_scale=args.guidance_scale,
            num_inference_steps=args.num_inference_steps,
            generator=torch.Generator().manual_seed(args.seed),
            max_sequence_length=run.dataset.info["captions"]["max_sequence_length"],
            output_type="pt",
            **options,
        ).images
    finally:
        run.transformer.train()
        if run.ema is not None:
            run.ema.restore(run.transformer.parameters())
    return images.float().cpu()


def log_text_validation(args, accelerator, run) -> Path:
    """A grid of samples of --validation_prompts (one row per prompt) under samples/, sent to the trackers."""
    images = sample_prompts(args, run, args.validation_prompts)
    path = Path(args.output_dir) / "samples" / f"step-{run.state.step:06d}.png"
    save_grid(images, [p[:40] or '""' for p in args.validation_prompts], path)
    send_to_trackers(accelerator, images, run.state.step)
    return path


def save_text_pipeline(args, run, report: dict, grid: Path | None, location: str) -> None:
    """The pipeline folder (`<Pipeline>.from_pretrained(out)`), or a LoRA run's adapter in diffusers' layout (and
    the merged pipeline with --save_merged); the privacy report and the model card."""
    out = Path(args.output_dir)
    if run.ema is not None:
        run.ema.copy_to(run.transformer.parameters())
    lora = report["trainable"] == "lora"
    if lora:
        save_lora_weights(run.transformer, out)
        merge_lora(run.transformer)
    if not lora or args.save_merged:
        load_pipeline(args, run).save_pretrained(out)
    (out / "privacy_report.json").write_text(json.dumps(report, indent=2))
    name = run.dataset.info["captions"]["pipeline"]
    card = text_model_card(report, args, name, grid.relative_to(out).as_posix() if grid else None, location)
    card.save(out / "README.md")


def text_model_card(report: dict, args, pipeline: str, grid: str | None, location: str) -> ModelCard:
    """The card of a text-to-image run: the guarantee per (image, caption) row, how to load and sample."""
    private = report["epsilon"] is not None
    base = args.pretrained_model_name_or_path
    data = ModelCardData(
        license=base_model_license(base, args.revision, args.cache_dir),
        base_model=base,
        library_name="diffusers",
        tags=(DP_TAGS if private else ["non-private-baseline"]) + ["text-to-image", "diffusers"],
    )
    how = "with DP-SGD" if private else "without privacy (non-private baseline)"
    if report["trainable"] == "lora" and not args.save_merged:
        load = f"pipe = {pipeline}.from_pretrained({base!r})\n"
        load += (
            f"pipe.load_lora_weights({location!r})\n"
            if pipeline == "StableDiffusion3Pipeline"
            else "from dp_utils.training.adapters import load_lora_weights\n\n"
            f"load_lora_weights(pipe.transformer, {location!r})  # PixArt pipelines have no LoRA loader\n"
        )
    else:
        load = f"pipe = {pipeline}.from_pretrained({location!r})\n"
    sections = [
        f"# {base} fine-tuned {how}",
        f"Fine-tuned from `{base}` by `train_dp_dit.py` (dp-dit) on {report['dataset_size']} captioned images. "
        f"{_guarantee(report)} The unit of privacy is one (image, caption) pair: the caption's encoding lives in "
        "its image's row, so the guarantee covers the captions as well as the images.",
        f"## Usage\n\n```python\nfrom diffusers import {pipeline}\n\n{load}"
        f"image = pipe({(args.validation_prompts or ['a photo'])[0]!r}).images[0]\n```",
    ]
    if grid:
        sections.append(f"## Samples\n\n![Samples, one row per validation prompt]({grid})")
    if private:
        sections.append("## What the guarantee covers\n\n" + "\n\n".join(guarantee_notes(report)))
    training = (
        f"{report['steps']} steps of Poisson sampling at rate {report['sample_rate']:.4g}, noise multiplier "
        f"{report['noise_multiplier']:.4g}, clipping norm {report['max_grad_norm']}, {report['accountant']} "
        f"accountant, captions dropped with probability {args.proportion_empty_prompts}. {_trained_note(report)}"
    )
    sections += [f"## Training\n\n{training}", f"## Privacy report\n\n```json\n{json.dumps(report, indent=2)}\n```"]
    return ModelCard(f"---\n{data.to_yaml()}\n---\n\n" + "\n\n".join(sections) + "\n")
