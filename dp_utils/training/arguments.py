"""The flags of train_dp_dit.py: diffusers' names where diffusers has the flag, every default shown by --help.

Ranges and combinations are checked by dp_utils.training.checks.check_flags after parsing.
"""

from __future__ import annotations

import argparse

from diffusers.optimization import SchedulerType

from ..errors import ArgumentParser
from ..privacy.privacy_engine import GRAD_SAMPLE_MODES
from .adapters import LORA_TARGET_MODULES, TRAINABLE
from .attention import ATTENTION_BACKENDS
from .augmentation import AUGMENTATIONS
from .model import PRESETS
from .optimizers import OPTIMIZERS

# diffusers' schedules that run on --lr_warmup_steps alone; piecewise_constant needs step rules no flag gives.
LR_SCHEDULERS = [t.value for t in SchedulerType if t is not SchedulerType.PIECEWISE_CONSTANT]


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """The module docstring as written, and every flag's default (unless its help already states it)."""

    def _get_help_string(self, action):
        help = action.help or ""
        if "default" in help or action.required or action.default is argparse.SUPPRESS:
            return help
        return f"{help} (default: %(default)s)"


def build_parser(description: str) -> argparse.ArgumentParser:
    """train_dp_dit.py's flags, grouped as its --help shows them."""
    parser = ArgumentParser(description=description, formatter_class=HelpFormatter)
    model = parser.add_argument_group("model (give --pretrained_model_name_or_path or --model_config)")
    model.add_argument(
        "--pretrained_model_name_or_path",
        help="Hub id or local folder of a DiT pipeline (transformer/, scheduler/), e.g. facebook/DiT-XL-2-256 "
        "(default: none, then --model_config).",
    )
    model.add_argument("--revision", help="Hub revision (branch, tag or commit) of the pipeline (default: main).")
    model.add_argument("--variant", help="Weights variant of the transformer, e.g. fp16 (default: the full weights).")
    model.add_argument(
        "--cache_dir", help="Where models downloaded from the Hub are cached (default: the Hugging Face cache)."
    )
    model.add_argument(
        "--model_config",
        help=f"Train from scratch instead (default: none): a preset ({', '.join(PRESETS)}; sample size, channels "
        "and classes from the cache, learned variance as in DiT) or the path of a DiTTransformer2DModel config.json.",
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
        help="Probability that an example's label is replaced by the null class, for classifier-free guidance; "
        "one draw per example.",
    )
    model.add_argument(
        "--proportion_empty_prompts",
        type=float,
        default=0.1,
        help="A captioned cache (PixArt, SD3): probability that an image's caption is replaced by the empty "
        "caption's encoding, for classifier-free guidance (as PixArt was trained); one draw per image.",
    )
    data = parser.add_argument_group("data")
    data.add_argument(
        "--latent_cache",
        required=True,
        help="The latent cache precompute_latents.py wrote (its --output_dir), not the image folder: "
        "`precompute_latents.py --train_data_dir images/ --output_dir cache/`, then `--latent_cache cache/`.",
    )
    data.add_argument(
        "--no_flip",
        action="store_true",
        help="Never use the mirrored view a cache made with --random_flip holds (by default each step picks one "
        "view per image at random).",
    )
    data.add_argument(
        "--max_train_samples",
        type=int,
        help="Train on this many images of the cache, drawn at random with --seed (default: all). N, q and delta "
        "are those of the images kept; the guarantee covers them.",
    )
    data.add_argument(
        "--dataloader_num_workers",
        type=int,
        default=0,
        help="Processes that read the cache and build the next physical batches while the model trains "
        "(0: the main process); batches are the same for any number. Pinned memory on CUDA.",
    )
    dp = parser.add_argument_group("differential privacy (give --target_epsilon or --noise_multiplier)")
    budget = dp.add_mutually_exclusive_group(required=True)
    budget.add_argument(
        "--target_epsilon",
        type=float,
        help="Privacy budget: the noise multiplier is calibrated so that training for the planned steps spends "
        "exactly this epsilon (at --delta).",
    )
    budget.add_argument(
        "--noise_multiplier",
        type=float,
        help="Noise std / clipping norm; epsilon is reported. 0 with a large --max_grad_norm is the non-private "
        "baseline, Poisson batches included (epsilon = inf).",
    )
    dp.add_argument("--delta", type=float, help="Delta of the guarantee (default: 1 / (10 N), well below 1/N).")
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
        help="Expected Poisson batch (the DP batch): each image is used in a step with probability "
        "1 / ceil(N / this).",
    )
    dp.add_argument(
        "--max_physical_batch_size",
        type=int,
        default=32,
        help="Images per forward/backward and process (Opacus' physical batch); a logical batch is processed in "
        "several and noised once (memory only, not privacy).",
    )
    dp.add_argument(
        "--grad_sample_mode",
        choices=GRAD_SAMPLE_MODES,
        default="flash_bk",
        help="flash_bk: one backward (book-keeping), peak memory as non-private training; flash: two backward "
        "passes, a little less memory, slower; opacus_ghost / opacus_hooks: Opacus' engines, as references (ghost "
        "needs --embedders freeze).",
    )
    dp.add_argument("--accountant", choices=["prv", "rdp"], default="prv", help="Opacus accountant.")
    dp.add_argument(
        "--noise_seed",
        type=int,
        help="Seed of the DP noise and the Poisson batches, for reproducible experiments only: the guarantee then "
        "holds only while this seed stays secret (it is written nowhere; log, report and card warn). Default: a "
        "fresh 128-bit secret from the operating system every run.",
    )
    dp.add_argument(
        "--noise_multiplicity",
        type=int,
        default=1,
        help="K noise and timestep draws per image and step, averaged and clipped as one example (costs K times "
        "the compute, lowers gradient variance).",
    )
    train = parser.add_argument_group("training")
    length = train.add_mutually_exclusive_group()
    length.add_argument(
        "--max_train_steps", type=int, help="Number of DP steps (logical batches); overrides --num_train_epochs."
    )
    length.add_argument("--num_train_epochs", type=int, default=10, help="Epochs of ceil(N / logical batch) steps.")
    train.add_argument("--learning_rate", type=float, default=1e-4, help="AdamW learning rate (DiT: 1e-4).")
    train.add_argument(
        "--lr_scheduler",
        choices=LR_SCHEDULERS,
        default="constant",
        help="Learning-rate schedule (diffusers.optimization) over the planned steps; data-independent, so free "
        "under DP.",
    )
    train.add_argument("--lr_warmup_steps", type=int, default=0, help="Warm-up steps of the lr schedule.")
    train.add_argument(
        "--optimizer",
        choices=OPTIMIZERS,
        default="adamw",
        help="The optimizer that applies each noised gradient (default: %(default)s). dp_adambc: Adam with the "
        "DP noise's variance (sigma C / B)^2 subtracted from its second moment (Tang et al., AAAI 2024; public "
        "quantities only), floored at --dp_adambc_gamma; sgd: SGD with --sgd_momentum.",
    )
    train.add_argument(
        "--dp_adambc_gamma",
        type=float,
        default=5e-8,
        help="dp_adambc's floor of the corrected second moment: where the noise dominates, the step is SGD with "
        "momentum at rate lr / sqrt(gamma).",
    )
    train.add_argument("--sgd_momentum", type=float, default=0.9, help="Momentum of --optimizer sgd.")
    train.add_argument(
        "--timestep_min",
        type=int,
        default=0,
        help="Train on diffusion timesteps in [--timestep_min, --timestep_max] only (DP-SynGen spends the budget on "
        "the timesteps that set shape and style); the last sampling steps can go to the public model.",
    )
    train.add_argument(
        "--timestep_max", type=int, help="Largest training timestep (default: the scheduler's last, 999 for DiT)."
    )
    train.add_argument(
        "--augmentation",
        choices=AUGMENTATIONS,
        default="none",
        help="shift: each of an image's --noise_multiplicity rows is shifted by a random whole number of latent "
        "pixels in [-1, 1] per axis (edges repeated): K augmented views clipped as one example (augmentation "
        "multiplicity), same privacy as K = 1.",
    )
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
        help="Autocast precision (default: the accelerate config's). Per-example norms are accumulated in fp32.",
    )
    train.add_argument(
        "--gradient_checkpointing",
        action="store_true",
        help="Whether or not to use gradient checkpointing to save memory at the expense of slower backward pass. "
        "The clipping engine then recomputes instead of storing (two backward passes): peak memory as non-private "
        "training with checkpointing.",
    )
    train.add_argument(
        "--cuda_graphs",
        action="store_true",
        default=None,
        help="Replay each physical batch's forward and clipped backward, and the noisy optimizer step, as CUDA "
        "graphs (no host work in the step). Default: on with CUDA and flash_bk/flash (with gradient checkpointing: "
        "from torch 2.10), off otherwise.",
    )
    train.add_argument(
        "--no_cuda_graphs",
        dest="cuda_graphs",
        action="store_false",
        default=argparse.SUPPRESS,  # --cuda_graphs' None stands
        help="Eager steps, no CUDA graphs (default: see --cuda_graphs).",
    )
    train.add_argument(
        "--attention_backend",
        choices=ATTENTION_BACKENDS,
        help="Attention kernel through diffusers' dispatcher (flash: the flash-attn package). Default: the model's "
        "own, PyTorch's scaled_dot_product_attention, which picks its kernel itself.",
    )
    train.add_argument(
        "--allow_tf32",
        action="store_true",
        help="Whether or not to allow TF32 on Ampere GPUs. Can be used to speed up training. For more information, "
        "see https://pytorch.org/docs/stable/notes/cuda.html#tensorfloat-32-tf32-on-ampere-devices",
    )
    train.add_argument(
        "--seed", type=int, default=0, help="Seed of init, timesteps, latents, samples; not of DP noise: --noise_seed."
    )
    io = parser.add_argument_group("output")
    io.add_argument("--output_dir", default="dp-dit-model", help="Pipeline, report, card, checkpoints, samples.")
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
        help="Save a resumable checkpoint every N steps (transformer/ and transformer_ema/ as save_pretrained "
        "folders; optimizer, lr schedule, accountant history, RNG states, the secret noise generator and sampling "
        "seed, step): as secret as the training images; 0 disables.",
    )
    io.add_argument("--checkpoints_total_limit", type=int, help="Keep at most this many checkpoints (default: all).")
    io.add_argument(
        "--resume_from_checkpoint",
        help="'latest' or a checkpoint folder; epsilon continues from it (default: start a new run).",
    )
    io.add_argument("--report_to", default="tensorboard", help="Accelerate trackers: tensorboard, wandb, all, none.")
    io.add_argument(
        "--log_private_metrics",
        action="store_true",
        help="Also log each step's training loss and Poisson batch size (trackers and progress bar). They are "
        "functions of the private data outside the (epsilon, delta) guarantee; the model card then says so. "
        "Default: epsilon, step, learning rate and throughput at the expected batch only.",
    )
    io.add_argument("--logging_dir", default="logs", help="Tracker logs, relative to --output_dir.")
    io.add_argument("--tracker_project_name", default="dp-dit", help="Project name given to the trackers.")
    io.add_argument(
        "--validation_steps",
        type=int,
        default=0,
        help="Sample a grid every N steps and at the end (EMA weights; the card shows the last); 0: no samples.",
    )
    io.add_argument(
        "--validation_classes", type=int, nargs="+", help="Class ids to sample (default: the first 32 classes)."
    )
    io.add_argument(
        "--validation_prompts",
        nargs="+",
        help="A captioned cache: prompts to sample at each validation (one grid row each; public text, not data).",
    )
    io.add_argument("--num_validation_images", type=int, default=4, help="Images per validation class.")
    io.add_argument(
        "--public_finisher_steps",
        type=int,
        default=0,
        help="Fine-tuning: the last K of --num_inference_steps sampling steps are the pretrained model's (the public "
        "prior cleans the details; post-processing, no privacy cost). Validation grids use it; the privacy report "
        "and the card name it and show how to sample so. Needs the checkpoint's class ids to be the dataset's.",
    )
    io.add_argument("--guidance_scale", type=float, default=4.0, help="Classifier-free guidance scale.")
    io.add_argument("--num_inference_steps", type=int, default=25, help="DPM-Solver steps when sampling.")
    hub = parser.add_argument_group("Hugging Face Hub")
    hub.add_argument(
        "--push_to_hub",
        action="store_true",
        help="Upload the finished output folder: model, card, privacy report, samples; never checkpoints (their "
        "RNG states replay the run) nor tracker logs (a loss curve on the private data).",
    )
    hub.add_argument("--hub_model_id", help="Repository to push to (default: the name of --output_dir).")
    hub.add_argument("--hub_token", help="Token for the Hub (default: the one `hf auth login` saved).")
    return parser
