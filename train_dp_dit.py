"""Differentially private (DP-SGD) fine-tuning of a Diffusion Transformer over a latent cache.

    python precompute_latents.py --train_data_dir photos/ --output_dir cache/ --resolution 256 --random_flip \\
        --pretrained_model_name_or_path facebook/DiT-XL-2-256
    accelerate launch train_dp_dit.py --pretrained_model_name_or_path facebook/DiT-XL-2-256 \\
        --latent_cache cache/ --output_dir dp-dit-out --target_epsilon 8 --logical_batch_size 256

The output folder loads with `DiTPipeline.from_pretrained("dp-dit-out")`, class names included
(`pipe.get_label_ids(["cat"])`); `checkpoint-<step>/transformer/` loads with `DiTTransformer2DModel.from_pretrained`.

A bad flag, path or dataset is refused before any compute with one `error: ...` line and exit code 2 (add `-q` to
`accelerate launch` so that line ends the output; with several processes torchrun's summary repeats it).

Every step draws a Poisson batch (each image independently, rate q), clips each image's gradient to
--max_grad_norm (exactly, nothing frozen: dp_utils' engine), adds Gaussian noise once, and an Opacus accountant
tracks (epsilon, delta). The unit of privacy is one training image (one row of the cache, its flip included).
Noise and batches come from an OS secret (not --seed) that checkpoints hold: they are as secret as the images.

A cache with captions (`precompute_latents.py --caption_column`) trains a PixArt-alpha/Sigma or SD3 pipeline given as
--pretrained_model_name_or_path instead, one (image, caption) row per unit of privacy: docs/text_to_image.md.
"""

from __future__ import annotations

import itertools
import logging
import math
import shutil
import sys
import time
from dataclasses import asdict, dataclass
from operator import attrgetter
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.logging import get_logger
from accelerate.utils import AutocastKwargs, ProjectConfiguration, set_seed
from diffusers import AutoencoderKL, DDPMScheduler, DiTTransformer2DModel
from diffusers.optimization import get_scheduler
from diffusers.training_utils import EMAModel
from tqdm.auto import tqdm

import dp_utils
from dp_utils.data.latent_cache import LatentDataset, load_latent_cache
from dp_utils.errors import UserError, run_script
from dp_utils.privacy.cuda_graphs import CHECKPOINTING_CAPTURABLE
from dp_utils.privacy.randomness import REPRODUCIBLE_NOISE_WARNING, DPRandomness
from dp_utils.privacy.sampling import PoissonBatchSampler
from dp_utils.training.adapters import TrainedParameters, lora_config, select_trainable, trained_parameters
from dp_utils.training.arguments import build_parser
from dp_utils.training.attention import set_attention_backend
from dp_utils.training.augmentation import augment
from dp_utils.training.batches import PhysicalBatch, PhysicalBatchDataset, physical_batch_keys, physical_batch_loader
from dp_utils.training.checkpoints import (
    TrainState,
    load_checkpoint,
    register_pretrained_hooks,
    resolve_checkpoint,
    save_checkpoint,
    what_is_trained,
)
from dp_utils.training.checks import (
    check_data,
    check_flags,
    check_loss,
    check_model_source,
    check_output_dir,
    previous_run_files,
    run_warnings,
)
from dp_utils.training.cpu_memory import retain_freed_memory
from dp_utils.training.distributed import check_world_size, run_on_cpu
from dp_utils.training.generation import public_finisher
from dp_utils.training.hub import create_model_repo, push_to_hub
from dp_utils.training.model import checkpoint_id2label, disable_label_dropout, fit_label_table
from dp_utils.training.optimizers import build_optimizer, check_noise_std, dp_noise_std
from dp_utils.training.outputs import log_validation, save_pipeline
from dp_utils.training.plan import RunPlan, plan_run, privacy_parameters, privacy_report, training_summary
from dp_utils.training.pretrained import load_model
from dp_utils.training.recipe import training_recipe
from dp_utils.training.released import noise_source, private_metrics, public_config
from dp_utils.training.text_to_image import (
    CaptionedBatch,
    CaptionedBatchDataset,
    captioned_batch_loss,
    is_text_to_image,
    log_text_validation,
    open_text_to_image,
    save_text_pipeline,
)
from dp_utils.training.timesteps import sample_timesteps, timestep_range
from dp_utils.training.variance import keep_rows_fixed, variance_rows

logger = get_logger(__name__)


@dataclass
class Run:
    """What the training loop works on."""

    transformer: DiTTransformer2DModel  # the DiT that is sampled and saved
    model: torch.nn.Module  # what trains: the transformer, or Opacus' wrapper of it
    optimizer: torch.optim.Optimizer  # the DP optimizer: clips, noises and accounts
    criterion: dp_utils.DPCriterion
    lr_scheduler: torch.optim.lr_scheduler.LRScheduler
    scheduler: DDPMScheduler  # the training noise schedule
    vae: AutoencoderKL | None  # None in pixel space
    dataset: LatentDataset
    null_label: int
    ema: EMAModel | None
    state: TrainState
    plan: RunPlan
    trained: TrainedParameters
    randomness: DPRandomness  # the DP noise and batches: secret, checkpointed

    def spent_epsilon(self) -> float:  # sigma = 0 is the non-private baseline: no guarantee at all
        if self.optimizer.noise_multiplier == 0:
            return math.inf
        return self.optimizer.privacy_engine.get_epsilon(self.plan.delta)


def start_accelerator(args) -> Accelerator:
    """The checks that need only the flags and the disk, then TF32, the Accelerator, logging and the seed."""
    check_output_dir(args)  # before anything is loaded or written
    check_model_source(args)
    if args.allow_tf32:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    logging_dir = Path(args.output_dir, args.logging_dir)
    project = ProjectConfiguration(project_dir=args.output_dir, logging_dir=str(logging_dir))
    accelerator = Accelerator(
        mixed_precision=args.mixed_precision, log_with=args.report_to, project_config=project, cpu=run_on_cpu()
    )
    check_world_size(accelerator.num_processes)
    if accelerator.device.type == "cpu":
        retain_freed_memory()  # no page faults for the activations of every step
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO, force=True)
    set_seed(args.seed)  # the same on every rank: identical initial models
    return accelerator


def open_data_and_model(args):
    """The DiT with its label table fitted to the cache's classes, and the cache as a dataset, validated together."""
    info = load_latent_cache(args.latent_cache)[1]  # a missing or stale cache is a UserError there
    if is_text_to_image(info):  # PixArt or SD3 over a cache with captions
        return open_text_to_image(args, info)
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
    dataset = LatentDataset(args.latent_cache, model.config, null_label=null_label, random_flip=not args.no_flip)
    if args.max_train_samples is not None and args.max_train_samples < len(dataset):
        dataset.select_random_rows(args.max_train_samples, args.seed)  # N below is the number kept
    return model, scheduler, vae, dataset, null_label


def make_private(args, accelerator, transformer, dataset, plan: RunPlan, randomness: DPRandomness):
    """--optimizer on the trainable parameters, wrapped by dp_utils: (model, DP optimizer, criterion, what trains)."""
    disable_label_dropout(transformer)
    lora = lora_config(args.lora_rank, args.lora_alpha, args.lora_target_modules) if args.trainable == "lora" else None
    select_trainable(transformer, args.trainable, args.embedders == "train", lora)
    if args.embedders == "freeze":
        dp_utils.freeze_embedders(transformer)
    if args.gradient_checkpointing:
        transformer.enable_gradient_checkpointing()
    transformer.to(accelerator.device).train()
    if args.attention_backend:
        set_attention_backend(transformer, args.attention_backend)
    noise_std = dp_noise_std(args, plan) if args.optimizer == "dp_adambc" else 0.0  # sigma C / B: public
    optimizer = build_optimizer(args, [p for p in transformer.parameters() if p.requires_grad], noise_std)
    fixed = variance_rows(transformer, transformer.config.in_channels)  # the learned-variance half stays as loaded
    keep_rows_fixed(optimizer, fixed)  # on the optimizer that applies the update: after the DP noise
    k = args.noise_multiplicity

    def per_draw_mse(prediction, noise):  # an image's K draws are its rows: its loss is their mean
        return dp_utils.per_sample_mse(prediction, noise) / k

    # The batches come from PoissonBatchSampler in train(), which can resume at any step: make_private gets the
    # plan's q and N, so the optimizer divides by the plan's expected batch q N. The returned model is what trains
    # (Opacus' modes wrap it); `transformer` stays the DiT that is sampled and saved.
    calibrate = args.target_epsilon is not None
    model, optimizer, criterion, _ = dp_utils.make_private(
        module=transformer,
        optimizer=optimizer,
        sample_rate=plan.sample_rate,
        dataset_size=plan.num_images,
        criterion=per_draw_mse,
        max_grad_norm=args.max_grad_norm,
        noise_multiplier=args.noise_multiplier,
        target_epsilon=args.target_epsilon,
        target_delta=plan.delta if calibrate else None,
        steps=plan.max_train_steps if calibrate else None,
        grad_sample_mode=args.grad_sample_mode,
        poisson_sampling=False,
        noise_multiplicity=k,
        distributed=accelerator.num_processes > 1,
        accountant=args.accountant,
        noise_generator=randomness.noise_generator,
        cuda_graphs=cuda_graphs_wanted(args, accelerator),
    )
    if args.optimizer == "dp_adambc":
        check_noise_std(noise_std, optimizer, accelerator.num_processes)
    return model, optimizer, criterion, trained_parameters(transformer, args.trainable, fixed)


def cuda_graphs_wanted(args, accelerator) -> bool:
    """--cuda_graphs as given; by default on where it runs: CUDA, our engine, a torch that can capture the noise."""
    if args.cuda_graphs is not None:
        return args.cuda_graphs
    supported = hasattr(torch.cuda.CUDAGraph, "register_generator_state") and (
        CHECKPOINTING_CAPTURABLE or not args.gradient_checkpointing
    )
    return accelerator.device.type == "cuda" and args.grad_sample_mode in ("flash_bk", "flash") and supported


def restore_or_begin(args, accelerator, run: Run, resume: Path | None) -> None:
    """Resume from a checkpoint (the budget continues), or clear what --overwrite_output_dir replaces; trackers."""
    register_pretrained_hooks(accelerator, run.transformer, run.ema, what_is_trained(args))
    accelerator.register_for_checkpointing(run.optimizer, run.lr_scheduler, run.state, run.randomness)  # secret
    if resume is not None:
        load_checkpoint(accelerator, resume)
        run.optimizer.privacy_engine.accountant.history = [tuple(h) for h in run.state.accountant_history]
        logger.info(f"Resumed from {resume} at step {run.state.step}.")
    if run.state.step >= run.plan.max_train_steps:
        raise UserError(
            f"The privacy budget of this run is already spent: {run.state.step} of {run.plan.max_train_steps} steps "
            f"done, epsilon = {run.spent_epsilon():.3f} at delta = {run.plan.delta:.2g}. Training further would "
            "exceed the guarantee; the trained model is in the output directory."
        )
    if accelerator.is_main_process:
        if args.overwrite_output_dir:
            for path in previous_run_files(args.output_dir):
                shutil.rmtree(path) if path.is_dir() else path.unlink()
        accelerator.init_trackers(args.tracker_project_name, config=public_config(args))  # no seeds, no token
    accelerator.wait_for_everyone()


def physical_batch_loss(args, accelerator, run: Run, latents, labels, mask) -> dp_utils.DPLoss:
    """Per-row losses (B*K,) of one physical batch: K noise and timestep draws per image, clipped as one example;
    padding rows give exact zeros. (Under CUDA graphs this is captured: the draws come from torch's default
    generator, which a replay advances, and autocast keeps no cache of casts.)"""
    k = args.noise_multiplicity
    latents, labels, mask = (x.repeat_interleave(k, 0) for x in (latents, labels, mask))  # (BK, ...)
    latents = augment(latents, args.augmentation)  # K views of each image, clipped as one example
    noise = torch.randn_like(latents)
    timesteps = sample_timesteps(
        len(latents), *timestep_range(args, run.scheduler.config.num_train_timesteps), latents.device
    )
    noisy = run.scheduler.add_noise(latents, noise, timesteps)
    with accelerator.autocast(autocast_handler=AutocastKwargs(cache_enabled=False)):
        prediction = run.model(noisy, timestep=timesteps, class_labels=labels).sample[:, : latents.shape[1]]
    return run.criterion(prediction, noise, mask=mask)  # the engine clips the sum over each image's K rows


def physical_step(args, accelerator, run: Run):
    """batch -> (its per-row losses, its number of images), after the clipped backward; a class-conditional batch
    (fixed shape) replayed as a CUDA graph where the optimizer is graphed, a captioned one eager."""

    def captioned(batch: CaptionedBatch) -> tuple[torch.Tensor, int]:
        if not len(batch.latents):  # an empty local batch still steps: noise, all-reduce and accounting
            return torch.zeros((), device=accelerator.device), 0
        loss = captioned_batch_loss(args, accelerator, run, batch)
        loss.backward()
        return loss.losses.detach(), len(batch.latents)

    def eager(latents, labels, mask):
        loss = physical_batch_loss(args, accelerator, run, latents, labels, mask)
        loss.backward()
        return loss.losses.detach()

    if is_text_to_image(run.dataset.info):
        return captioned
    losses_of = eager
    if getattr(run.optimizer, "graphed_step", None) is not None:
        losses_of = dp_utils.CudaGraphedStep(lambda *tensors: physical_batch_loss(args, accelerator, run, *tensors))

    def class_conditional(batch: PhysicalBatch) -> tuple[torch.Tensor, int]:
        tensors = (x.to(accelerator.device, non_blocking=True) for x in (batch.latents, batch.labels, batch.mask))
        return losses_of(*tensors), int(batch.mask.sum())  # the mask is still on the host: no device sync

    return class_conditional


def noisy_step(args, run: Run, loss_sum: torch.Tensor) -> None:
    """The logical batch's DP step; a non-finite loss or norm stops the run before the update (one host sync)."""
    try:
        if args.grad_sample_mode.startswith("opacus"):  # their optimizers do not check the norms
            check_loss(loss_sum.item(), run.state.step, args.learning_rate)
        run.optimizer.step()
    except FloatingPointError:
        check_loss(math.nan, run.state.step, args.learning_rate)


def train(args, accelerator, run: Run) -> float:
    """The DP steps from the current one to the plan's end; returns the epsilon spent."""
    world, k, state, plan = accelerator.num_processes, args.noise_multiplicity, run.state, run.plan
    sampler = PoissonBatchSampler(
        plan.num_images,
        plan.sample_rate,
        plan.max_train_steps,
        run.randomness.sampling_seed,
        accelerator.process_index,
        world,
        state.step,
    )
    opacus = args.grad_sample_mode.startswith("opacus")
    size, rank = args.max_physical_batch_size, accelerator.process_index
    if is_text_to_image(run.dataset.info):  # prompt lengths vary: unpadded, eager
        batches = CaptionedBatchDataset(run.dataset, args.proportion_empty_prompts, args.seed, rank)
    else:
        batches = PhysicalBatchDataset(run.dataset, args.class_dropout_prob, run.null_label, args.seed, rank, size)
    keys = physical_batch_keys(sampler, state.step, size)
    loader = physical_batch_loader(batches, keys, args.dataloader_num_workers, accelerator.device.type == "cuda")
    step_physical_batch = physical_step(args, accelerator, run)
    # A PRV epsilon costs ~0.1 s, as much as a small model's step: refresh it about 100 times per run.
    epsilon_every = math.ceil(plan.max_train_steps / 100)
    epsilon = run.spent_epsilon()
    # Our engine adds every physical batch's clipped sum into the same buffers; Opacus' optimizers take one backward
    # per step (hooks: each more counts as another batch, q times their number; ghost: the next backward zeroes
    # the last one's clipped sum), so their physical batches are folded in by skipped steps, as Opacus'
    # BatchMemoryManager does. Either way the noise is added once, after the last. Nothing in a logical batch reads
    # a value back from the device until its noisy step.
    show = dict(disable=not accelerator.is_local_main_process, desc="DP steps")
    with tqdm(range(state.step, plan.max_train_steps), initial=state.step, total=plan.max_train_steps, **show) as bar:
        tick = time.perf_counter()
        for _, physical_batches in itertools.groupby(loader, key=attrgetter("step")):  # one logical batch
            loss_sum = torch.zeros((), device=accelerator.device, dtype=torch.float64)
            rows = images = 0
            for batch in physical_batches:  # all padding if the local batch is empty
                losses, real = step_physical_batch(batch)
                loss_sum += losses.sum() * k
                rows, images = rows + real * k, images + real
                if opacus and not batch.last:
                    run.optimizer.signal_skip_step(do_skip=True)  # clip and sum this batch into summed_grad
                    run.optimizer.step()
                    run.optimizer.zero_grad(set_to_none=True)
            noisy_step(args, run, loss_sum)
            run.lr_scheduler.step()
            run.optimizer.zero_grad(set_to_none=True)
            if run.ema is not None:
                run.ema.step(run.transformer.parameters())
            state.step += 1
            state.accountant_history = list(run.optimizer.privacy_engine.accountant.history)
            now, seconds = time.perf_counter(), time.perf_counter() - tick
            tick = now
            lr = float(run.lr_scheduler.get_last_lr()[0])  # a device tensor under CUDA graphs (one sync)
            # throughput at the expected (public) batch: the step's own batch size is private
            logs = {"lr": lr, "samples/s": plan.expected_batch_size / seconds}
            if args.log_private_metrics:  # functions of the private data, outside the accounting
                logs.update(private_metrics(accelerator, loss_sum.item(), rows, images))
            if state.step % epsilon_every == 0 or state.step == plan.max_train_steps:
                epsilon = logs["epsilon"] = run.spent_epsilon()
            bar.update(1)
            shown = {"loss": f"{logs['loss']:.4f}"} if "loss" in logs else {}
            bar.set_postfix(**shown, eps=f"{epsilon:.3f}", lr=f"{lr:.2g}", **{"img/s": f"{logs['samples/s']:.1f}"})
            accelerator.log(logs, step=state.step)
            if args.checkpointing_steps and state.step % args.checkpointing_steps == 0:
                if hasattr(run.optimizer, "discard_noise_ahead"):  # the checkpoint holds the generator before it
                    run.optimizer.discard_noise_ahead()
                save_checkpoint(accelerator, args.output_dir, state.step, args.checkpoints_total_limit)
            if args.validation_steps and state.step % args.validation_steps == 0 and accelerator.is_main_process:
                validate(args, accelerator, run)
    return epsilon


def validate(args, accelerator, run: Run) -> Path:
    """A sample grid with the EMA weights, one row per class: saved under samples/ and sent to the trackers."""
    if is_text_to_image(run.dataset.info):
        return log_text_validation(args, accelerator, run)
    classes = args.validation_classes or list(range(min(run.dataset.num_classes, 32))) or [run.null_label]
    names = run.dataset.class_names if run.dataset.conditional else None
    return log_validation(
        args,
        accelerator,
        run.transformer,
        run.ema,
        run.scheduler,
        run.vae,
        classes,
        names,
        run.null_label,
        run.state.step,
    )


def finish(args, accelerator, run: Run, epsilon: float, repo_id: str | None) -> None:
    """Check that every rank holds the same weights; save the pipeline, privacy report and card; push them."""
    accelerator.wait_for_everyone()
    world = accelerator.num_processes
    if world > 1:  # the noise is drawn on rank 0 and all-reduced: ranks that differ would void the accounting
        checksum = torch.stack([p.detach().double().sum() for p in run.transformer.parameters()])
        checksums = accelerator.gather(checksum.to(accelerator.device)[None])  # (world, params)
        if not (checksums == checksums[0]).all():
            raise RuntimeError("The processes ended with different weights; the run is not a valid DP run.")
    if accelerator.is_main_process:
        report = privacy_report(
            run.plan,
            epsilon,
            run.state.step,
            run.state.privacy_parameters,
            accountant=args.accountant,
            grad_sample_mode=args.grad_sample_mode,
            **asdict(run.trained),
            world_size=world,
            noise_seed_given=run.randomness.reproducible,
            noise_source=noise_source(run.randomness.reproducible),
            private_metrics_logged=args.log_private_metrics,
            recipe=training_recipe(args, run.scheduler.config.num_train_timesteps, run.optimizer.original_optimizer),
        )
        grid = validate(args, accelerator, run) if args.validation_steps else None
        location = repo_id or args.output_dir
        if is_text_to_image(run.dataset.info):
            save_text_pipeline(args, run, report, grid, location)
        else:
            save_pipeline(args, run.transformer, run.ema, run.scheduler, run.vae, run.dataset, report, grid, location)
        saved = "the LoRA adapter" if args.trainable == "lora" and not args.save_merged else "the pipeline"
        logger.info(f"Saved {saved}, privacy_report.json and README.md to {args.output_dir}; epsilon {epsilon:.3f}")
        if repo_id is not None:
            push_to_hub(args.output_dir, repo_id, args.logging_dir, args.hub_token)
            logger.info(f"Pushed {args.output_dir} to https://huggingface.co/{repo_id} (checkpoints and logs stay).")
    accelerator.end_training()


def main(args):
    accelerator = start_accelerator(args)
    repo_id = create_model_repo(args.output_dir, args.hub_model_id, args.hub_token) if args.push_to_hub else None
    resume = None
    if args.resume_from_checkpoint:
        resume = resolve_checkpoint(args.resume_from_checkpoint, args.output_dir, what_is_trained(args))
    transformer, scheduler, vae, dataset, null_label = open_data_and_model(args)
    timestep_range(args, scheduler.config.num_train_timesteps)  # refused before any compute
    if args.public_finisher_steps:
        public_finisher(args, dataset.class_names if dataset.conditional else None)  # likewise
    plan = plan_run(len(dataset), args.logical_batch_size, args.max_train_steps, args.num_train_epochs, args.delta)
    check_data(args, plan.num_images, dataset.num_classes, dataset.conditional, plan.delta)
    # a Poisson batch never holds more than N images: rows past N would only ever be padding
    args.max_physical_batch_size = min(args.max_physical_batch_size, plan.num_images)
    for warning in run_warnings(plan.num_images, args.logical_batch_size, plan.delta):
        logger.warning(warning)

    randomness = DPRandomness(args.noise_seed, accelerator.device)  # the DP noise and batches: never from --seed
    if randomness.reproducible:
        logger.warning(REPRODUCIBLE_NOISE_WARNING)
    # LoRA adapters are initialised from --seed in make_private: the same on every rank, so before the next line
    model, optimizer, criterion, trained = make_private(args, accelerator, transformer, dataset, plan, randomness)
    set_seed(args.seed, device_specific=True)  # each rank its own diffusion noise; the DP noise comes from rank 0
    if vae is not None:
        vae.to(accelerator.device).eval().requires_grad_(False)
    lr_scheduler = get_scheduler(
        args.lr_scheduler,
        optimizer=optimizer,
        num_warmup_steps=args.lr_warmup_steps,
        num_training_steps=plan.max_train_steps,
    )
    ema = None
    if args.use_ema:
        ema = EMAModel(
            transformer.parameters(),
            decay=args.ema_decay,
            model_cls=type(transformer),
            model_config=transformer.config,
        )
    parameters = privacy_parameters(plan, optimizer.noise_multiplier, args.max_grad_norm, args.noise_multiplicity)
    state = TrainState(parameters)
    run = Run(
        transformer,
        model,
        optimizer,
        criterion,
        lr_scheduler,
        scheduler,
        vae,
        dataset,
        null_label,
        ema,
        state,
        plan,
        trained,
        randomness,
    )
    restore_or_begin(args, accelerator, run, resume)
    physical = f"{args.max_physical_batch_size} per process, {accelerator.num_processes} process(es)"
    logger.info(training_summary(plan, state.privacy_parameters, args.accountant, transformer, physical, state.step))
    logger.info(f"DP-SGD is {trained.describe()}.")
    epsilon = train(args, accelerator, run)
    finish(args, accelerator, run, epsilon, repo_id)


def parse_args(input_args=None):
    args = build_parser(__doc__).parse_args(input_args)
    if args.embedders is None:  # full fine-tuning trains them; attention and LoRA keep the checkpoint's
        args.embedders = "train" if args.trainable == "full" else "freeze"
    check_flags(args)
    if args.report_to == "none":
        args.report_to = None
    return args


if __name__ == "__main__":
    sys.exit(run_script(lambda: main(parse_args())))
