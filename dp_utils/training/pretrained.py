"""Loading what the trainer starts from: a DiT pipeline's parts from the Hub or a folder, a preset, or a config."""

from __future__ import annotations

from pathlib import Path

from diffusers import AutoencoderKL, DDPMScheduler, DiTTransformer2DModel

from ..errors import UserError, one_line
from .model import PRESETS, dit_from_preset


def from_pretrained(cls, path: str, flag: str, **kwargs):
    """`cls.from_pretrained`; a path that is neither a local folder nor on the Hub, or a folder whose files cannot be
    read (a config that is not JSON, weights missing or truncated), is a UserError, not a traceback."""
    try:
        return cls.from_pretrained(path, **kwargs)
    except (OSError, ValueError) as error:  # diffusers raises OSError for unreadable files, ValueError for bad ones
        if Path(path).is_dir():
            part = Path(path, kwargs.get("subfolder") or "")
            raise UserError(f"{flag} {path}: {part} cannot be loaded ({one_line(error)}).") from None
        reason = str(error).strip().splitlines()[0]
        raise UserError(f"{flag} {path}: no such folder, and not found on the Hugging Face Hub ({reason})") from None


def load_model(args, info: dict) -> tuple[DiTTransformer2DModel, DDPMScheduler, AutoencoderKL | None]:
    """The DiT (from a pipeline, a preset or a config), the training noise schedule, and the VAE of the cache.

    `info` is the cache's metadata: a preset takes its sample size, channels and classes from it; a latent cache
    names the VAE that decodes samples (None in pixel space).
    """
    if args.pretrained_model_name_or_path:
        path, flag = args.pretrained_model_name_or_path, "--pretrained_model_name_or_path"
        hub = dict(revision=args.revision, cache_dir=args.cache_dir)
        model = from_pretrained(
            DiTTransformer2DModel, path, flag, subfolder="transformer", variant=args.variant, **hub
        )
        scheduler = from_pretrained(DDPMScheduler, path, flag, subfolder="scheduler", **hub)
    elif args.model_config in PRESETS:
        channels, size = info["latent_shape"][0], info["latent_shape"][1]
        model = dit_from_preset(args.model_config, channels, size, max(info["num_classes"], 1))
        scheduler = DDPMScheduler(num_train_timesteps=1000)  # DiT's linear schedule
    else:
        try:
            model = DiTTransformer2DModel.from_config(DiTTransformer2DModel.load_config(args.model_config))
        except (OSError, ValueError, TypeError) as error:
            raise UserError(f"--model_config {args.model_config} is not a DiT config ({one_line(error)}).") from None
        scheduler = DDPMScheduler(num_train_timesteps=1000)
    vae = None
    if not info["pixel_space"]:
        vae = from_pretrained(
            AutoencoderKL,
            info["vae"],
            "The cache's VAE",
            subfolder=info.get("vae_subfolder"),
            cache_dir=args.cache_dir,
        )
    return model, scheduler, vae
