"""Differentially private (DP-SGD) fine-tuning of a Diffusion Transformer over a latent cache.

    python precompute_latents.py --train_data_dir photos/ --output_dir cache/ --resolution 256
    accelerate launch train_dp_dit.py --pretrained_model_name_or_path facebook/DiT-XL-2-256 \\
        --train_data_dir cache/ --output_dir dp-dit-out --target_epsilon 8 --logical_batch_size 256

A bad flag, path or dataset is refused before any compute with one `error: ...` line and exit code 2 (add `-q` to
`accelerate launch` so that line ends the output; with several processes torchrun's summary repeats it).

Every step draws a Poisson batch (each image independently, rate q), clips each image's gradient to
--max_grad_norm (exactly, nothing frozen: dp_utils' engine), adds Gaussian noise once, and an Opacus accountant
tracks (epsilon, delta). The unit of privacy is one training image (one row of the cache, its flip included).
"""

from __future__ import annotations

import argparse
import logging
import math
import shutil
import sys
from dataclasses import asdict
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.logging import get_logger
from accelerate.utils import ProjectConfiguration, set_seed
from diffusers import AutoencoderKL, DDPMScheduler, DiTTransformer2DModel
from diffusers.training_utils import EMAModel
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

import dp_utils
from dp_utils.adapters import LORA_TARGET_MODULES, TRAINABLE, lora_config, select_trainable, trained_parameters
from dp_utils.checkpoints import TrainState, resolve_checkpoint, save_checkpoint
from dp_utils.cpu_memory import retain_freed_memory
from dp_utils.data import LatentDataset, load_latent_cache
from dp_utils.distributed import check_world_size, run_on_cpu
from dp_utils.errors import UserError, run_script
from dp_utils.model import (
    PRESETS,
    checkpoint_id2label,
    disable_label_dropout,
    dit_from_preset,
    drop_labels,
    fit_label_table,
)
from dp_utils.outputs import log_validation, save_pipeline
from dp_utils.sampling import PoissonBatchSampler
from dp_utils.validation import (
    check_data,
    check_flags,
    check_loss,
    check_model_source,
    check_output_dir,
    previous_run_files,
    run_warnings,
)
from dp_utils.variance import keep_rows_fixed, variance_rows

logger = get_logger(__name__)


def from_pretrained(cls, path: str, flag: str, **kwargs):
    """`cls.from_pretrained`; a path that is neither a local folder nor on the Hub is a UserError, not a traceback."""
    try:
        return cls.from_pretrained(path, **kwargs)
    except OSError as error:
        if Path(path).is_dir():
            raise
        reason = str(error).strip().splitlines()[0]
        raise UserError(f"{flag} {path}: no such folder, and not found on the Hugging Face Hub ({reason})") from error


def load_model(args, info: dict) -> tuple[DiTTransformer2DModel, DDPMScheduler, AutoencoderKL | None]:
    """The DiT (from the Hub or a preset), the training noise schedule, and the VAE that decodes samples."""
    if args.pretrained_model_name_or_path:
        path, flag = args.pretrained_model_name_or_path, "--pretrained_model_name_or_path"
        model = from_pretrained(DiTTransformer2DModel, path, flag, subfolder="transformer")
        scheduler = from_pretrained(DDPMScheduler, path, flag, subfolder="scheduler")
    elif args.model_config in PRESETS:
        channels, size = info["latent_shape"][0], info["latent_shape"][1]
        model = dit_from_preset(args.model_config, channels, size, max(info["num_classes"], 1))
        scheduler = DDPMScheduler(num_train_timesteps=1000)  # DiT's linear schedule
    else:
        model = DiTTransformer2DModel.from_config(DiTTransformer2DModel.load_config(args.model_config))
        scheduler = DDPMScheduler(num_train_timesteps=1000)
    vae = None
    if not info["pixel_space"]:
        vae = from_pretrained(AutoencoderKL, info["vae"], "The cache's VAE", subfolder=info.get("vae_subfolder"))
    return model, scheduler, vae


def open_data_and_model(args):
    """The DiT with its label table fitted to the cache's classes, and the cache as a dataset, validated together."""
    info = load_latent_cache(args.train_data_dir)[1]  # a missing or stale cache is a UserError there
    model, scheduler, vae = load_model(args, info)
    mapping, pretrained = None, args.pretrained_model_name_or_path
    if info["conditional"]:  # the checkpoint's rows of the dataset's classes are kept, matched by name
        id2label = checkpoint_id2label(pretrained, model) if pretrained else None
        mapping = fit_label_table(model, info["class_names"], id2label, args.new_class_init)
        logger.info(
            f"Resizing the label table to the dataset's {info['num_classes']} classes plus the null class: "
            f"{mapping.describe(info['class_names'])}."
        )
        if mapping.new and args.embedders == "freeze":
            logger.warning("The new classes' label rows stay at their initialisation: the embedders are frozen.")
    adapter_suffices = pretrained and (mapping is None or mapping.identity)  # the checkpoint + the adapter
    if args.trainable == "lora" and not args.save_merged and not adapter_suffices:
        logger.warning(
            "The LoRA adapter alone cannot reproduce this model (its label table or base is not the checkpoint's): "
            "the merged pipeline is saved too (--save_merged)."
        )
        args.save_merged = True
    null_label = model.config.num_embeds_ada_norm
    dataset = LatentDataset(args.train_data_dir, model.config, null_label=null_label, random_flip=not args.no_flip)
    return model, scheduler, vae, dataset, null_label


def piece_loss(args, accelerator, model, criterion, scheduler, dataset, piece, null_label) -> torch.Tensor:
    """Per-row losses (B*K,) of one physical batch: K noise and timestep draws per image, clipped as one example."""
    batch = [dataset[i] for i in piece]
    latents = torch.stack([b[0] for b in batch]).to(accelerator.device)  # (B, C, H, W)
    labels = drop_labels(torch.stack([b[1] for b in batch]), args.class_dropout_prob, null_label)
    k, channels = args.noise_multiplicity, latents.shape[1]
    latents, labels = latents.repeat_interleave(k, 0), labels.repeat_interleave(k, 0).to(accelerator.device)  # (BK,)
    noise = torch.randn_like(latents)
    timesteps = torch.randint(0, scheduler.config.num_train_timesteps, (len(latents),), device=latents.device)
    noisy = scheduler.add_noise(latents, noise, timesteps)
    with accelerator.autocast():
        prediction = model(noisy, timestep=timesteps, class_labels=labels).sample[:, :channels]
    return criterion(prediction, noise)  # the engine clips the sum over each image's K rows


def main(args):
    check_output_dir(args)  # before anything is loaded or written
    check_model_source(args)
    resume = resolve_checkpoint(args.resume_from_checkpoint, args.output_dir) if args.resume_from_checkpoint else None
    if args.allow_tf32:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    project = ProjectConfiguration(project_dir=args.output_dir, logging_dir=str(Path(args.output_dir, "logs")))
    accelerator = Accelerator(
        mixed_precision=args.mixed_precision, log_with=args.report_to, project_config=project, cpu=run_on_cpu()
    )
    check_world_size(accelerator.num_processes)
    if accelerator.device.type == "cpu":
        retain_freed_memory()  # no page faults for the activations of every step
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO, force=True)
    set_seed(args.seed)  # the same on every rank: identical initial models

    transformer, scheduler, vae, dataset, null_label = open_data_and_model(args)
    n = len(dataset)
    steps_per_epoch = math.ceil(n / args.logical_batch_size)
    max_train_steps = args.max_train_steps or args.num_train_epochs * steps_per_epoch
    sample_rate = 1 / steps_per_epoch
    delta = args.delta if args.delta is not None else 1 / (10 * n)  # well below 1/N
    check_data(args, n, dataset.num_classes, dataset.conditional, delta)
    for warning in run_warnings(n, args.logical_batch_size, delta):
        logger.warning(warning)

    disable_label_dropout(transformer)
    lora = lora_config(args.lora_rank, args.lora_alpha, args.lora_target_modules) if args.trainable == "lora" else None
    select_trainable(transformer, args.trainable, args.embedders == "train", lora)  # before any per-rank seed
    if args.embedders == "freeze":
        dp_utils.freeze_embedders(transformer)
    if args.gradient_checkpointing:
        transformer.enable_gradient_checkpointing()
    transformer.to(accelerator.device).train()
    set_seed(args.seed, device_specific=True)  # each rank its own diffusion noise; the DP noise comes from rank 0
    if vae is not None:
        vae.to(accelerator.device).eval().requires_grad_(False)
    optimizer = torch.optim.AdamW(
        [p for p in transformer.parameters() if p.requires_grad],
        lr=args.learning_rate,
        betas=(args.adam_beta1, args.adam_beta2),
        weight_decay=args.adam_weight_decay,
    )
    fixed = variance_rows(transformer, transformer.config.in_channels)  # the learned-variance half stays as loaded
    keep_rows_fixed(optimizer, fixed)  # on the optimizer that applies the update: after the DP noise
    trained = trained_parameters(transformer, args.trainable, fixed)
    world = accelerator.num_processes
    k = args.noise_multiplicity

    def per_draw_mse(prediction, noise):  # an image's K draws are its rows: its loss is their mean
        return dp_utils.per_sample_mse(prediction, noise) / k

    # make_private derives Opacus' sample rate (1 / steps per epoch) and expected batch from this loader;
    # the batches themselves come from PoissonBatchSampler below, which can resume at any step. The returned
    # model is what trains (Opacus' modes wrap it); `transformer` stays the DiT that is sampled and saved.
    model, optimizer, criterion, _ = dp_utils.make_private(
        module=transformer,
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
    ema = EMAModel(transformer.parameters(), decay=args.ema_decay) if args.use_ema else None
    accelerator.register_for_checkpointing(transformer, optimizer, state, *([ema] if ema is not None else []))
    if resume is not None:
        accelerator.load_state(str(resume))
        privacy_engine.accountant.history = [tuple(h) for h in state.accountant_history]
        logger.info(f"Resumed from {resume} at step {state.step}.")
    if state.step >= max_train_steps:
        raise UserError(
            f"The privacy budget of this run is already spent: {state.step} of {max_train_steps} steps done, "
            f"epsilon = {spent_epsilon():.3f} at delta = {delta:.2g}. Training further would "
            "exceed the guarantee; the trained model is in the output directory."
        )

    if accelerator.is_main_process:
        if args.overwrite_output_dir:
            for path in previous_run_files(args.output_dir):
                if path.is_dir():
                    shutil.rmtree(path)
                else:
                    path.unlink()
        accelerator.init_trackers(
            "dp-dit",
            config={k: v for k, v in vars(args).items() if v is None or isinstance(v, int | float | str | bool)},
        )
    accelerator.wait_for_everyone()
    logger.info(
        f"{n} images, q = {sample_rate:.4g} (expected batch {n * sample_rate:.1f}), {max_train_steps} steps, "
        f"sigma = {optimizer.noise_multiplier:.4g}, C = {args.max_grad_norm}, delta = {delta:.2g}, "
        f"{trained.describe()}"
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
    classes = args.validation_classes or list(range(min(dataset.num_classes, 8))) or [null_label]
    # A PRV epsilon costs ~0.1 s, as much as a small model's step: refresh it about 100 times per run.
    epsilon_every = math.ceil(max_train_steps / 100)
    epsilon = spent_epsilon()
    # Opacus' optimizers take one backward per step (hooks: each more counts as another batch, q times their
    # number; ghost: the next backward zeroes the last one's clipped sum). The pieces of a logical batch are folded
    # in by skipped steps instead, as Opacus' BatchMemoryManager does; the noise is added once, after the last.
    fold_pieces = args.grad_sample_mode.startswith("opacus")
    with tqdm(
        range(state.step, max_train_steps),
        initial=state.step,
        total=max_train_steps,
        disable=not accelerator.is_local_main_process,
        desc="DP steps",
    ) as progress:  # closed on an error too: the message starts its own line
        for indices in sampler:
            loss_sum, rows = 0.0, 0
            for start in range(0, len(indices), args.max_physical_batch_size):  # physical batches of one logical batch
                piece = indices[start : start + args.max_physical_batch_size]
                loss = piece_loss(args, accelerator, model, criterion, scheduler, dataset, piece, null_label)
                batch_loss = loss.detach().sum().item() * k
                check_loss(batch_loss, state.step, args.learning_rate)  # nothing clipped, noised or accounted yet
                loss.backward()
                loss_sum, rows = loss_sum + batch_loss, rows + len(piece) * k
                if fold_pieces and start + args.max_physical_batch_size < len(indices):
                    optimizer.signal_skip_step(do_skip=True)  # clip and sum this piece into summed_grad
                    optimizer.step()
                    optimizer.zero_grad(set_to_none=True)
            optimizer.step()  # an empty local batch still steps: noise, all-reduce and accounting stay in step
            optimizer.zero_grad(set_to_none=True)
            if ema is not None:
                ema.step(transformer.parameters())
            state.step += 1
            state.accountant_history = list(privacy_engine.accountant.history)
            logs = {"loss": loss_sum / max(rows, 1), "batch": len(indices) * world}
            if state.step % epsilon_every == 0 or state.step == max_train_steps:
                epsilon = logs["epsilon"] = spent_epsilon()
            progress.update(1)
            progress.set_postfix(loss=f"{logs['loss']:.4f}", eps=f"{epsilon:.3f}")
            accelerator.log(logs, step=state.step)
            if args.checkpointing_steps and state.step % args.checkpointing_steps == 0:
                save_checkpoint(accelerator, args.output_dir, state.step, args.checkpoints_total_limit)
            if args.validation_steps and state.step % args.validation_steps == 0 and accelerator.is_main_process:
                log_validation(args, accelerator, transformer, ema, scheduler, vae, classes, null_label, state.step)

    accelerator.wait_for_everyone()
    if world > 1:  # the noise is drawn on rank 0 and all-reduced: ranks that differ would void the accounting
        checksum = torch.stack([p.detach().double().sum() for p in transformer.parameters()]).to(accelerator.device)
        checksums = accelerator.gather(checksum[None])  # (world, params)
        if not (checksums == checksums[0]).all():
            raise RuntimeError("The processes ended with different weights; the run is not a valid DP run.")
    if accelerator.is_main_process:
        report = dict(
            epsilon=None if math.isinf(epsilon) else epsilon,
            delta=delta,
            weak_delta_accepted=delta >= 1 / n,
            noise_multiplier=optimizer.noise_multiplier,
            sample_rate=sample_rate,
            steps=state.step,
            accountant=args.accountant,
            dataset_size=n,
            expected_batch_size=n * sample_rate,
            max_grad_norm=args.max_grad_norm,
            grad_sample_mode=args.grad_sample_mode,
            noise_multiplicity=k,
            **asdict(trained),
            unit_of_privacy="one training image (one cache row, all its views)",
            world_size=world,
        )
        if args.validation_steps:
            log_validation(args, accelerator, transformer, ema, scheduler, vae, classes, null_label, state.step)
        save_pipeline(args, transformer, ema, scheduler, vae, dataset, report)
        logger.info(f"Saved the model and privacy_report.json to {args.output_dir}: epsilon = {epsilon:.3f}")
    accelerator.end_training()


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
        "--trainable",
        choices=TRAINABLE,
        default="full",
        help="What DP-SGD trains (default: %(default)s). full: every parameter; attention: the attention modules "
        "only (q, k, v, out; as DP-LDM); lora: peft LoRA adapters on --lora_target_modules, saved as "
        "pytorch_lora_weights.safetensors (diffusers' LoRA layout). Fewer trained parameters, less noise in total. "
        "In every mode the variance half of a learned-sigma DiT's output (proj_out_2's variance rows) keeps the "
        "checkpoint's weights: the saved model suits samplers that use the noise prediction only (DiTPipeline's "
        "default, DPM-Solver, DDIM, DDPM with a fixed variance); DDPM with variance_type='learned_range' uses the "
        "checkpoint's variance prediction, untrained on the new data (random when training from scratch).",
    )
    model.add_argument(
        "--embedders",
        choices=["train", "freeze"],
        default=None,
        help="train: the timestep/class embedders are trained too, the reused first embedder included (exact "
        "per-example clipping; in attention mode, the only way new classes' rows learn); freeze: freeze them, the "
        "Opacus ghost-clipping work-around. Default: train with --trainable full, freeze otherwise (a LoRA file "
        "cannot hold them: lora refuses train).",
    )
    model.add_argument("--lora_rank", type=int, default=4, help="LoRA rank r (default: %(default)s).")
    model.add_argument(
        "--lora_alpha",
        type=float,
        help="LoRA alpha: the adapter's update is scaled by alpha / r (default: the rank, scale 1).",
    )
    model.add_argument(
        "--lora_target_modules",
        nargs="+",
        default=LORA_TARGET_MODULES,
        help="Module names (peft target_modules) that get LoRA adapters (default: %(default)s, the attention "
        "projections). DiT's other linear layers: ff.net.0.proj ff.net.2 norm1.linear proj_out_1 proj_out_2.",
    )
    model.add_argument(
        "--save_merged",
        action="store_true",
        help="With --trainable lora, also save the model with the adapter merged as a full DiTPipeline folder (done "
        "anyway when the adapter alone cannot reproduce it: a label table refitted to new classes).",
    )
    model.add_argument(
        "--new_class_init",
        default="null",
        help="Fine-tuning: the dataset's classes keep the checkpoint's label rows of the same name (its id2label); a "
        "class it lacks starts from: null (the unconditional row), mean (the mean of its class rows), or the name "
        "of a checkpoint class, e.g. a close ImageNet class (default: %(default)s).",
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
    dp.add_argument(
        "--accept_weak_delta",
        action="store_true",
        help="Accept a --delta >= 1/N, a weak guarantee (publishing one image in full meets it); without this flag "
        "such a delta is refused. The privacy report and model card state it.",
    )
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
        help="flash_bk: one backward (book-keeping), peak memory as non-private training; flash: two backward "
        "passes, a little less memory, slower; opacus_ghost / opacus_hooks: Opacus' engines, as references (ghost "
        "needs --embedders freeze).",
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
    train.add_argument(
        "--gradient_checkpointing",
        action="store_true",
        help="Whether or not to use gradient checkpointing to save memory at the expense of slower backward pass. "
        "The clipping engine then recomputes instead of storing (two backward passes): peak memory as non-private "
        "training with checkpointing.",
    )
    train.add_argument(
        "--allow_tf32",
        action="store_true",
        help="Whether or not to allow TF32 on Ampere GPUs. Can be used to speed up training. For more information, "
        "see https://pytorch.org/docs/stable/notes/cuda.html#tensorfloat-32-tf32-on-ampere-devices",
    )
    train.add_argument("--seed", type=int, default=0, help="Seed of the model, sampling and noise draws.")
    io = parser.add_argument_group("output")
    io.add_argument("--output_dir", default="dp-dit-model", help="Pipeline, privacy report, checkpoints, samples.")
    io.add_argument(
        "--overwrite_output_dir",
        action="store_true",
        help="Train into an --output_dir that holds another run, deleting its checkpoints and finished model first "
        "(without it, such a folder is refused).",
    )
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
    if args.embedders is None:  # full fine-tuning trains them; attention and LoRA keep the checkpoint's
        args.embedders = "train" if args.trainable == "full" else "freeze"
    check_flags(args)
    if args.report_to == "none":
        args.report_to = None
    return args


if __name__ == "__main__":
    sys.exit(run_script(lambda: main(parse_args())))
