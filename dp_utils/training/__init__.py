"""The glue of train_dp_dit.py: flags, checks, plan and report, checkpoints, outputs and card, Hub, models, LoRA."""
