"""Differentially private (DP-SGD) fine-tuning of a Diffusion Transformer over a latent cache.

    python precompute_latents.py --train_data_dir photos/ --output_dir cache/ --resolution 256
    accelerate launch train_dp_dit.py --pretrained_model_name_or_path facebook/DiT-XL-2-256 \\
        --train_data_dir cache/ --output_dir dp-dit-out --target_epsilon 8 --logical_batch_size 256

Every step draws a Poisson batch (each image independently, rate q), clips each image's gradient to
--max_grad_norm (exactly, nothing frozen: dp_utils' engine), adds Gaussian noise once, and an Opacus accountant
tracks (epsilon, delta). The unit of privacy is one training image (one row of the cache, its flip included).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import shutil
import sys
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.logging import get_logger
from accelerate.utils import ProjectConfiguration, set_seed
from diffusers import AutoencoderKL, DDPMScheduler, DiTPipeline, DiTTransformer2DModel, DPMSolverMultistepScheduler
from diffusers.training_utils import EMAModel
from PIL import Image
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

import dp_utils
from dp_utils.cpu_memory import retain_freed_memory
from dp_utils.data import LatentDataset, load_latent_cache
from dp_utils.distributed import check_world_size, run_on_cpu
from dp_utils.generation import generate
from dp_utils.model import (
    PRESETS,
    disable_label_dropout,
    dit_from_preset,
    drop_labels,
    pad_label_table_for_pipeline,
    resize_label_table,
)
from dp_utils.sampling import PoissonBatchSampler

logger = get_logger(__name__)


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
                raise ValueError(
                    f"The checkpoint was trained with {key}={state['privacy'][key]}, this run has "
                    f"{self.privacy[key]}: resuming would break the privacy accounting. Resume with the same "
                    "dataset and DP flags (--target_epsilon, --noise_multiplier, --logical_batch_size, ...)."
                )
        self.step, self.accountant_history = state["step"], state["accountant_history"]


def load_model(args, info: dict) -> tuple[DiTTransformer2DModel, DDPMScheduler, AutoencoderKL | None]:
    """The DiT (from the Hub or a preset), the training noise schedule, and the VAE that decodes samples."""
    if args.pretrained_model_name_or_path:
        path = args.pretrained_model_name_or_path
        model = DiTTransformer2DModel.from_pretrained(path, subfolder="transformer")
        scheduler = DDPMScheduler.from_pretrained(path, subfolder="scheduler")
    elif args.model_config in PRESETS:
        channels, size = info["latent_shape"][0], info["latent_shape"][1]
        model = dit_from_preset(args.model_config, channels, size, max(info["num_classes"], 1))
        scheduler = DDPMScheduler(num_train_timesteps=1000)  # DiT's linear schedule
    else:
        model = DiTTransformer2DModel.from_config(DiTTransformer2DModel.load_config(args.model_config))
        scheduler = DDPMScheduler(num_train_timesteps=1000)
    vae = None
    if not info["pixel_space"]:
        vae = AutoencoderKL.from_pretrained(info["vae"], subfolder=info.get("vae_subfolder"))
    return model, scheduler, vae


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
    pad_label_table_for_pipeline(model)
    id2label = dict(enumerate(dataset.class_names)) if dataset.conditional else None
    if vae is not None:
        DiTPipeline(
            transformer=model, vae=vae, scheduler=sampling_scheduler(scheduler, pixel_space=False), id2label=id2label
        ).save_pretrained(out)
    else:  # pixel space: no VAE to decode with; the transformer and scheduler are the model
        model.save_pretrained(out / "transformer")
        sampling_scheduler(scheduler, pixel_space=True).save_pretrained(out / "scheduler")
    (out / "privacy_report.json").write_text(json.dumps(report, indent=2))
    if report["epsilon"] is None:
        guarantee = "**no privacy guarantee**: it was trained without noise (the non-private baseline)."
    else:
        guarantee = (
            f"**({report['epsilon']:.3g}, {report['delta']:.3g})-differential privacy** with respect to the addition "
            "or removal of **one training image** (one row of the latent cache, its mirrored view included)."
        )
    (out / "README.md").write_text(
        f"# DiT fine-tuned with DP-SGD\n\nTrained by `train_dp_dit.py` with {guarantee}\n\n"
        f"{report['steps']} steps of Poisson sampling at rate {report['sample_rate']:.4g} on "
        f"{report['dataset_size']} images, noise multiplier {report['noise_multiplier']:.4g}, clipping norm "
        f"{report['max_grad_norm']} ({report['accountant']} accountant). Frozen: {report['frozen'] or 'nothing'}. "
        "The guarantee covers the training images, not the data of a pretrained checkpoint.\n\n"
        f"```json\n{json.dumps(report, indent=2)}\n```\n"
    )


def main(args):
    project = ProjectConfiguration(project_dir=args.output_dir, logging_dir=str(Path(args.output_dir, "logs")))
    accelerator = Accelerator(
        mixed_precision=args.mixed_precision, log_with=args.report_to, project_config=project, cpu=run_on_cpu()
    )
    check_world_size(accelerator.num_processes)
    if accelerator.device.type == "cpu":
        retain_freed_memory()  # no page faults for the activations of every step
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO, force=True)
    set_seed(args.seed)  # the same on every rank: identical initial models

    info = load_latent_cache(args.train_data_dir)[1]
    model, scheduler, vae = load_model(args, info)
    if info["conditional"] and model.config.num_embeds_ada_norm != info["num_classes"]:
        logger.info(f"Resizing the label table to the dataset's {info['num_classes']} classes plus the null class.")
        resize_label_table(model, info["num_classes"])
    null_label = model.config.num_embeds_ada_norm
    dataset = LatentDataset(args.train_data_dir, model.config, null_label=null_label, random_flip=not args.no_flip)
    disable_label_dropout(model)
    frozen = dp_utils.freeze_embedders(model) if args.embedders == "freeze" else []
    model.to(accelerator.device).train()
    set_seed(args.seed, device_specific=True)  # each rank its own diffusion noise; the DP noise comes from rank 0
    if vae is not None:
        vae.to(accelerator.device).eval().requires_grad_(False)

    optimizer = torch.optim.AdamW(
        [p for p in model.parameters() if p.requires_grad],
        lr=args.learning_rate,
        betas=(args.adam_beta1, args.adam_beta2),
        weight_decay=args.adam_weight_decay,
    )
    n = len(dataset)
    steps_per_epoch = math.ceil(n / args.logical_batch_size)
    max_train_steps = args.max_train_steps or args.num_train_epochs * steps_per_epoch
    delta = args.delta if args.delta is not None else 1 / (10 * n)  # well below 1/N
    world = accelerator.num_processes
    k = args.noise_multiplicity

    def per_draw_mse(prediction, noise):  # an image's K draws are its rows: its loss is their mean
        return dp_utils.per_sample_mse(prediction, noise) / k

    # make_private derives Opacus' sample rate (1 / steps per epoch) and expected batch from this loader;
    # the batches themselves come from PoissonBatchSampler below, which can resume at any step.
    model, optimizer, criterion, _ = dp_utils.make_private(
        module=model,
        optimizer=optimizer,
        data_loader=DataLoader(dataset, batch_size=args.logical_batch_size),
        criterion=per_draw_mse,
        max_grad_norm=args.max_grad_norm,
        noise_multiplier=args.noise_multiplier,
        target_epsilon=args.target_epsilon,
        target_delta=delta if args.target_epsilon is not None else None,
        steps=max_train_steps if args.target_epsilon is not None else None,
        grad_sample_mode=args.grad_sample_mode,
        poisson_sampling=False,
        noise_multiplicity=args.noise_multiplicity,
        distributed=world > 1,
        accountant=args.accountant,
    )
    privacy_engine = optimizer.privacy_engine

    def spent_epsilon() -> float:  # sigma = 0 is the non-private baseline: no guarantee at all
        return privacy_engine.get_epsilon(delta) if optimizer.noise_multiplier > 0 else math.inf

    sample_rate = 1 / steps_per_epoch
    state = TrainState(
        dict(
            noise_multiplier=optimizer.noise_multiplier,
            sample_rate=sample_rate,
            dataset_size=n,
            max_grad_norm=args.max_grad_norm,
            noise_multiplicity=args.noise_multiplicity,
            delta=delta,
            max_train_steps=max_train_steps,
        )
    )
    ema = EMAModel(model.parameters(), decay=args.ema_decay) if args.use_ema else None
    accelerator.register_for_checkpointing(model, optimizer, state, *([ema] if ema is not None else []))

    if args.resume_from_checkpoint:
        checkpoint = args.resume_from_checkpoint
        if checkpoint == "latest":
            found = sorted(Path(args.output_dir).glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))
            checkpoint = found[-1] if found else None
        if checkpoint is None or not Path(checkpoint).is_dir():
            raise FileNotFoundError(
                f"No checkpoint to resume from at {args.resume_from_checkpoint!r} ({args.output_dir})."
            )
        accelerator.load_state(str(checkpoint))
        privacy_engine.accountant.history = [tuple(h) for h in state.accountant_history]
        logger.info(f"Resumed from {checkpoint} at step {state.step}.")
    if state.step >= max_train_steps:
        raise ValueError(
            f"The privacy budget of this run is already spent: {state.step} of {max_train_steps} steps done, "
            f"epsilon = {spent_epsilon():.3f} at delta = {delta:.2g}. Training further would "
            "exceed the guarantee; the trained model is in the output directory."
        )

    if accelerator.is_main_process:
        accelerator.init_trackers(
            "dp-dit",
            config={k: v for k, v in vars(args).items() if v is None or isinstance(v, int | float | str | bool)},
        )
    logger.info(
        f"{n} images, q = {sample_rate:.4g} (expected batch {n * sample_rate:.1f}), {max_train_steps} steps, "
        f"sigma = {optimizer.noise_multiplier:.4g}, C = {args.max_grad_norm}, delta = {delta:.2g}, "
        f"frozen: {len(frozen)} tensors"
    )
    sampler = PoissonBatchSampler(
        n,
        sample_rate,
        max_train_steps,
        seed=args.seed,
        rank=accelerator.process_index,
        world_size=world,
        start_step=state.step,
    )
    channels = model.config.in_channels
    classes = args.validation_classes or list(range(min(dataset.num_classes, 8))) or [null_label]
    progress = tqdm(
        range(state.step, max_train_steps),
        initial=state.step,
        total=max_train_steps,
        disable=not accelerator.is_local_main_process,
        desc="DP steps",
    )
    # A PRV epsilon costs ~0.1 s, as much as a small model's step: refresh it about 100 times per run.
    epsilon_every = math.ceil(max_train_steps / 100)
    epsilon = spent_epsilon()
    for indices in sampler:
        loss_sum, rows = 0.0, 0
        for start in range(0, len(indices), args.max_physical_batch_size):  # physical batches of one logical batch
            batch = [dataset[i] for i in indices[start : start + args.max_physical_batch_size]]
            latents = torch.stack([b[0] for b in batch]).to(accelerator.device)  # (B, C, H, W)
            labels = drop_labels(torch.stack([b[1] for b in batch]), args.class_dropout_prob, null_label)
            latents, labels = latents.repeat_interleave(k, 0), labels.repeat_interleave(k, 0).to(accelerator.device)
            noise = torch.randn_like(latents)  # K noise and timestep draws per image, clipped as one example
            timesteps = torch.randint(0, scheduler.config.num_train_timesteps, (len(latents),), device=latents.device)
            noisy = scheduler.add_noise(latents, noise, timesteps)
            with accelerator.autocast():
                prediction = model(noisy, timestep=timesteps, class_labels=labels).sample[:, :channels]
            loss = criterion(prediction, noise)  # (B*K,): the engine clips the sum over each image's K rows
            loss.backward()
            loss_sum, rows = loss_sum + loss.detach().sum().item() * k, rows + len(latents)
        optimizer.step()  # an empty local batch still steps: noise, all-reduce and accounting stay in step
        optimizer.zero_grad(set_to_none=True)
        if ema is not None:
            ema.step(model.parameters())
        state.step += 1
        state.accountant_history = list(privacy_engine.accountant.history)
        logs = {"loss": loss_sum / max(rows, 1), "batch": len(indices) * world}
        if state.step % epsilon_every == 0 or state.step == max_train_steps:
            epsilon = logs["epsilon"] = spent_epsilon()
        progress.update(1)
        progress.set_postfix(loss=f"{logs['loss']:.4f}", eps=f"{epsilon:.3f}")
        accelerator.log(logs, step=state.step)
        if args.checkpointing_steps and state.step % args.checkpointing_steps == 0:
            save_checkpoint(args, accelerator, state.step)
        if args.validation_steps and state.step % args.validation_steps == 0 and accelerator.is_main_process:
            log_validation(args, accelerator, model, ema, scheduler, vae, classes, null_label, state.step)
    progress.close()

    accelerator.wait_for_everyone()
    if world > 1:  # the noise is drawn on rank 0 and all-reduced: ranks that differ would void the accounting
        checksum = torch.stack([p.detach().double().sum() for p in model.parameters()]).to(accelerator.device)
        checksums = accelerator.gather(checksum[None])  # (world, params)
        if not (checksums == checksums[0]).all():
            raise RuntimeError("The processes ended with different weights; the run is not a valid DP run.")
    if accelerator.is_main_process:
        report = dict(
            epsilon=None if math.isinf(epsilon) else epsilon,
            delta=delta,
            noise_multiplier=optimizer.noise_multiplier,
            sample_rate=sample_rate,
            steps=state.step,
            accountant=args.accountant,
            dataset_size=n,
            expected_batch_size=n * sample_rate,
            max_grad_norm=args.max_grad_norm,
            grad_sample_mode=args.grad_sample_mode,
            noise_multiplicity=k,
            frozen=frozen,
            unit_of_privacy="one training image (one cache row, all its views)",
            world_size=world,
        )
        if args.validation_steps:
            log_validation(args, accelerator, model, ema, scheduler, vae, classes, null_label, state.step)
        save_pipeline(args, model, ema, scheduler, vae, dataset, report)
        logger.info(f"Saved the model and privacy_report.json to {args.output_dir}: epsilon = {epsilon:.3f}")
    accelerator.end_training()


def save_checkpoint(args, accelerator, step: int) -> None:
    """accelerator.save_state to output_dir/checkpoint-{step}, keeping at most --checkpoints_total_limit."""
    out = Path(args.output_dir)
    if accelerator.is_main_process and args.checkpoints_total_limit:
        old = sorted(out.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))
        for path in old[: max(0, len(old) - args.checkpoints_total_limit + 1)]:
            shutil.rmtree(path)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(out / f"checkpoint-{step}"))


def parse_args(input_args=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    model = parser.add_argument_group("model")
    model.add_argument(
        "--pretrained_model_name_or_path",
        help="Hub id or local folder of a DiT pipeline (transformer/, scheduler/, vae/), e.g. facebook/DiT-XL-2-256.",
    )
    model.add_argument(
        "--model_config",
        help=f"Train from scratch instead: a preset ({', '.join(PRESETS)}; sample size, channels and classes from "
        "the cache, learned variance as in DiT) or the path of a DiTTransformer2DModel config.json.",
    )
    model.add_argument(
        "--embedders",
        choices=["train", "freeze"],
        default="train",
        help="train: every "
        "parameter is trained, the reused first embedder included (exact per-example clipping); "
        "freeze: freeze every timestep/class embedder, the Opacus ghost-clipping work-around.",
    )
    model.add_argument(
        "--class_dropout_prob",
        type=float,
        default=0.1,
        help="Probability that an example's label "
        "is replaced by the null class, for classifier-free guidance; one draw per example.",
    )
    data = parser.add_argument_group("data")
    data.add_argument("--train_data_dir", required=True, help="Latent cache written by precompute_latents.py.")
    data.add_argument(
        "--no_flip",
        action="store_true",
        help="Never use the mirrored view a cache made with --flip "
        "holds (by default each step picks one view per image at random).",
    )
    dp = parser.add_argument_group("differential privacy")
    budget = dp.add_mutually_exclusive_group(required=True)
    budget.add_argument(
        "--target_epsilon",
        type=float,
        help="Privacy budget: the noise multiplier is calibrated "
        "so that training for the planned steps spends exactly this epsilon (at --delta).",
    )
    budget.add_argument(
        "--noise_multiplier",
        type=float,
        help="Noise std / clipping norm; epsilon is reported. 0 with a large --max_grad_norm is the non-private "
        "baseline on the same batches (epsilon = inf).",
    )
    dp.add_argument("--delta", type=float, help="Delta of the guarantee (default 1 / (10 N), well below 1/N).")
    dp.add_argument("--max_grad_norm", type=float, default=1.0, help="Clipping norm C of each image's gradient.")
    dp.add_argument(
        "--logical_batch_size",
        type=int,
        default=256,
        help="Expected Poisson batch (the DP batch): "
        "each image is used in a step with probability 1 / ceil(N / this).",
    )
    dp.add_argument(
        "--max_physical_batch_size",
        type=int,
        default=32,
        help="Images per forward/backward; a "
        "logical batch is processed in several such pieces and noised once (memory only, not privacy).",
    )
    dp.add_argument(
        "--grad_sample_mode",
        choices=dp_utils.GRAD_SAMPLE_MODES,
        default="flash_bk",
        help="flash_bk: one backward (book-keeping); flash: two backward passes, less memory; "
        "opacus_ghost / opacus_hooks: Opacus' engines, as references (ghost needs --embedders freeze).",
    )
    dp.add_argument("--accountant", choices=["prv", "rdp"], default="prv", help="Opacus accountant.")
    dp.add_argument(
        "--noise_multiplicity",
        type=int,
        default=1,
        help="K noise and timestep draws per image and "
        "step, averaged and clipped as one example (costs K times the compute, lowers gradient variance).",
    )
    train = parser.add_argument_group("training")
    length = train.add_mutually_exclusive_group()
    length.add_argument("--max_train_steps", type=int, help="Number of DP steps (logical batches).")
    length.add_argument("--num_train_epochs", type=int, default=10, help="Epochs of N / logical_batch_size steps.")
    train.add_argument("--learning_rate", type=float, default=1e-4, help="AdamW learning rate (DiT: 1e-4).")
    train.add_argument("--adam_beta1", type=float, default=0.9, help="AdamW beta1.")
    train.add_argument("--adam_beta2", type=float, default=0.999, help="AdamW beta2.")
    train.add_argument("--adam_weight_decay", type=float, default=0.0, help="AdamW weight decay (DiT: none).")
    train.add_argument(
        "--use_ema",
        action="store_true",
        help="Keep an EMA of the weights; saved and used for sampling (post-processing: no privacy cost).",
    )
    train.add_argument("--ema_decay", type=float, default=0.9999, help="EMA decay (DiT: 0.9999).")
    train.add_argument(
        "--mixed_precision",
        choices=["no", "fp16", "bf16"],
        default=None,
        help="Autocast precision (default: accelerate config). Per-example norms are accumulated in fp32 regardless.",
    )
    train.add_argument("--seed", type=int, default=0, help="Seed of the model, sampling and noise draws.")
    io = parser.add_argument_group("output")
    io.add_argument("--output_dir", default="dp-dit-model", help="Pipeline, privacy report, checkpoints, samples.")
    io.add_argument(
        "--checkpointing_steps",
        type=int,
        default=500,
        help="Save a resumable checkpoint every N "
        "steps (model, optimizer, EMA, accountant history, RNG and step); 0 disables.",
    )
    io.add_argument("--checkpoints_total_limit", type=int, help="Keep at most this many checkpoints.")
    io.add_argument("--resume_from_checkpoint", help="'latest' or a checkpoint folder; epsilon continues from it.")
    io.add_argument("--report_to", default="tensorboard", help="Accelerate trackers: tensorboard, wandb, all, none.")
    io.add_argument(
        "--validation_steps",
        type=int,
        default=0,
        help="Sample a grid every N steps and at the end (EMA weights); 0: no samples.",
    )
    io.add_argument("--validation_classes", type=int, nargs="+", help="Class ids to sample (default: first 8).")
    io.add_argument("--num_validation_images", type=int, default=4, help="Images per validation class.")
    io.add_argument("--guidance_scale", type=float, default=4.0, help="Classifier-free guidance scale.")
    io.add_argument("--num_inference_steps", type=int, default=25, help="DPM-Solver steps when sampling.")
    args = parser.parse_args(input_args)
    if bool(args.pretrained_model_name_or_path) == bool(args.model_config):
        raise ValueError("Give exactly one of --pretrained_model_name_or_path or --model_config.")
    if args.report_to == "none":
        args.report_to = None
    if args.noise_multiplicity < 1 or args.logical_batch_size < 1 or args.max_physical_batch_size < 1:
        raise ValueError("--noise_multiplicity, --logical_batch_size and --max_physical_batch_size must be >= 1.")
    return args


if __name__ == "__main__":
    sys.exit(main(parse_args()))
