"""Class-conditional sampling with classifier-free guidance, in latent space (with a VAE) or in pixel space."""

from __future__ import annotations

import functools
import json
from pathlib import Path

import torch
from diffusers import AutoencoderKL, DiTTransformer2DModel, DPMSolverMultistepScheduler
from diffusers.schedulers import SchedulerMixin

from ..errors import UserError
from .model import checkpoint_id2label


@torch.no_grad()
def generate(
    transformer: DiTTransformer2DModel,
    scheduler: SchedulerMixin,
    class_labels: list[int],
    null_label: int,
    guidance_scale: float = 4.0,
    num_inference_steps: int = 25,
    vae: AutoencoderKL | None = None,
    generator: torch.Generator | None = None,
    finisher: DiTTransformer2DModel | None = None,
    finisher_steps: int = 0,
) -> torch.Tensor:
    """Images (N, C, H, W) in [0, 1] for the given classes, as DiTPipeline samples them.

    The learned-variance half of the output channels is ignored: the scheduler uses its fixed variance. With a
    `finisher` (e.g. the public model the DP model was fine-tuned from, same class ids), the last `finisher_steps`
    steps are its: post-processing of the DP model's output, no privacy cost.
    """
    if finisher_steps and (finisher is None or not 0 <= finisher_steps <= num_inference_steps):
        raise ValueError(f"finisher_steps = {finisher_steps} needs a finisher and at most {num_inference_steps}.")
    device, dtype = transformer.device, transformer.dtype
    channels, size = transformer.config.in_channels, transformer.config.sample_size
    latents = torch.randn((len(class_labels), channels, size, size), generator=generator).to(device, dtype)
    labels = torch.tensor(class_labels, device=device)
    guided = guidance_scale > 1
    if guided:
        labels = torch.cat([labels, torch.full_like(labels, null_label)])
    scheduler.set_timesteps(num_inference_steps)
    for i, t in enumerate(scheduler.timesteps):
        model_input = scheduler.scale_model_input(torch.cat([latents] * 2) if guided else latents, t)
        timesteps = t.to(device).expand(model_input.shape[0])
        model = finisher if i >= len(scheduler.timesteps) - finisher_steps else transformer
        eps = model(model_input, timestep=timesteps, class_labels=labels).sample[:, :channels]
        if guided:
            cond, uncond = eps.chunk(2)
            eps = uncond + guidance_scale * (cond - uncond)
        latents = scheduler.step(eps, t, latents).prev_sample
    images = vae.decode(latents / vae.config.scaling_factor).sample if vae is not None else latents
    return (images.float() / 2 + 0.5).clamp(0, 1)


def sample_pixel_pipeline(
    model_dir: str | Path,
    class_labels: list[int],
    guidance_scale: float = 4.0,
    num_inference_steps: int = 25,
    seed: int = 0,
    finisher_dir: str | Path | None = None,
    finisher_steps: int = 0,
) -> torch.Tensor:
    """Images (N, C, H, W) in [0, 1] from a pixel-space pipeline folder the trainer wrote, with DPM-Solver.

    Guidance takes the model's null class, id `num_embeds_ada_norm` (in a table the trainer saved, padded to 1000 class
    rows, the ids after the data's classes hold the null row too). `finisher_dir`: another pipeline folder (the public
    model) whose transformer takes the last `finisher_steps` steps; both must name the same classes by the same ids.
    """
    model_dir = Path(model_dir)
    transformer = DiTTransformer2DModel.from_pretrained(model_dir / "transformer").eval()
    scheduler = DPMSolverMultistepScheduler.from_pretrained(model_dir / "scheduler")
    finisher = load_finisher(finisher_dir, transformer, model_dir) if finisher_steps else None
    return generate(
        transformer,
        scheduler,
        class_labels,
        null_label=transformer.config.num_embeds_ada_norm,
        guidance_scale=guidance_scale,
        num_inference_steps=num_inference_steps,
        generator=torch.Generator().manual_seed(seed),
        finisher=finisher,
        finisher_steps=finisher_steps,
    )


def load_finisher(
    finisher_dir: str | Path, transformer: DiTTransformer2DModel, model_dir: Path
) -> DiTTransformer2DModel:
    """The finisher pipeline's transformer, refused unless its class ids (null id included) are the model's."""
    finisher_dir = Path(finisher_dir)
    finisher = DiTTransformer2DModel.from_pretrained(finisher_dir / "transformer").eval()
    same_names = pipeline_id2label(model_dir) == pipeline_id2label(finisher_dir)
    if not same_names or transformer.config.num_embeds_ada_norm != finisher.config.num_embeds_ada_norm:
        raise ValueError(f"{finisher_dir} names other classes than {model_dir}: it cannot finish its samples.")
    return finisher


def pipeline_id2label(folder: Path) -> dict | None:
    """The class names a pipeline folder stores in model_index.json (None when it has none)."""
    index = folder / "model_index.json"
    return json.loads(index.read_text()).get("id2label") if index.exists() else None


@functools.cache
def _pretrained_transformer(pretrained: str, revision: str | None, cache_dir: str | None) -> DiTTransformer2DModel:
    return DiTTransformer2DModel.from_pretrained(
        pretrained, subfolder="transformer", revision=revision, cache_dir=cache_dir
    )


def public_finisher(args, class_names: list[str] | None) -> DiTTransformer2DModel:
    """The pretrained (public) transformer for --public_finisher_steps, refused unless its class ids are the data's."""
    finisher = _pretrained_transformer(args.pretrained_model_name_or_path, args.revision, args.cache_dir).eval()
    id2label = checkpoint_id2label(args.pretrained_model_name_or_path, finisher)
    if class_names and (id2label is None or [id2label.get(i) for i in range(len(class_names))] != list(class_names)):
        raise UserError(
            "--public_finisher_steps: the pretrained model's class ids are not the dataset's classes in order, so it "
            "cannot finish samples of them; leave the flag out."
        )
    return finisher
