"""Class-conditional sampling with classifier-free guidance, in latent space (with a VAE) or in pixel space."""

from __future__ import annotations

from pathlib import Path

import torch
from diffusers import AutoencoderKL, DiTTransformer2DModel, DPMSolverMultistepScheduler
from diffusers.schedulers import SchedulerMixin


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
) -> torch.Tensor:
    """Images (N, C, H, W) in [0, 1] for the given classes, as DiTPipeline samples them.

    The learned-variance half of the output channels is ignored: the scheduler uses its fixed variance.
    """
    device, dtype = transformer.device, transformer.dtype
    channels, size = transformer.config.in_channels, transformer.config.sample_size
    latents = torch.randn((len(class_labels), channels, size, size), generator=generator).to(device, dtype)
    labels = torch.tensor(class_labels, device=device)
    guided = guidance_scale > 1
    if guided:
        labels = torch.cat([labels, torch.full_like(labels, null_label)])
    scheduler.set_timesteps(num_inference_steps)
    for t in scheduler.timesteps:
        model_input = scheduler.scale_model_input(torch.cat([latents] * 2) if guided else latents, t)
        timesteps = t.to(device).expand(model_input.shape[0])
        eps = transformer(model_input, timestep=timesteps, class_labels=labels).sample[:, :channels]
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
) -> torch.Tensor:
    """Images (N, C, H, W) in [0, 1] from a pixel-space pipeline folder the trainer wrote, with DPM-Solver.

    Guidance takes the model's null class, id `num_embeds_ada_norm` (in a table the trainer saved, padded to 1000 class
    rows, the ids after the data's classes hold the null row too).
    """
    model_dir = Path(model_dir)
    transformer = DiTTransformer2DModel.from_pretrained(model_dir / "transformer").eval()
    scheduler = DPMSolverMultistepScheduler.from_pretrained(model_dir / "scheduler")
    return generate(
        transformer,
        scheduler,
        class_labels,
        null_label=transformer.config.num_embeds_ada_norm,
        guidance_scale=guidance_scale,
        num_inference_steps=num_inference_steps,
        generator=torch.Generator().manual_seed(seed),
    )
