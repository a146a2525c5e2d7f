"""What a run did beyond clipping and noise, as privacy_report.json records it and the model card says it:
the optimizer, the timestep range, augmentation multiplicity, and post-processing with a public model."""

from __future__ import annotations


def training_recipe(args, num_train_timesteps: int, inner_optimizer) -> dict:
    """The report's `recipe` entry (all public: flags, and dp_adambc's (sigma C / B)^2)."""
    recipe = dict(
        optimizer=args.optimizer,
        learning_rate=args.learning_rate,
        timestep_range=[
            args.timestep_min,
            num_train_timesteps - 1 if args.timestep_max is None else args.timestep_max,
        ],
        augmentation=args.augmentation,
        views_per_image=args.noise_multiplicity,
    )
    if args.public_finisher_steps:
        recipe["public_finisher"] = dict(
            model=args.pretrained_model_name_or_path,
            last_steps=args.public_finisher_steps,
            of_steps=args.num_inference_steps,
        )
    if args.optimizer == "dp_adambc":
        recipe.update(dp_adambc_noise_variance=inner_optimizer.noise_variance, dp_adambc_gamma=args.dp_adambc_gamma)
    return recipe


def describe_recipe(report: dict) -> str:
    """One sentence per lever in use, for the card ("" for a default run)."""
    recipe, notes = report.get("recipe") or {}, []
    if recipe.get("optimizer") == "dp_adambc":
        notes.append(
            f"Optimizer: DP-AdamBC (Tang et al., AAAI 2024), lr {recipe['learning_rate']:g}: the DP noise's variance "
            f"(sigma C / B)^2 = {recipe['dp_adambc_noise_variance']:.3g}, public, is subtracted from Adam's second "
            f"moment, floored at {recipe['dp_adambc_gamma']:g}."
        )
    elif recipe.get("optimizer") == "sgd":
        notes.append(f"Optimizer: SGD with momentum, lr {recipe['learning_rate']:g}.")
    low, high = recipe.get("timestep_range", (0, None))
    if low > 0 or (high is not None and high < 999):
        notes.append(f"Trained on diffusion timesteps {low} to {high} only.")
    if recipe.get("augmentation", "none") != "none":
        notes.append(
            f"Augmentation multiplicity: {recipe['views_per_image']} {recipe['augmentation']}ed views of each image "
            "per step, clipped together as one example."
        )
    finisher = recipe.get("public_finisher")
    if finisher:
        notes.append(
            f"Sampling (post-processing, no privacy cost): the last {finisher['last_steps']} of "
            f"{finisher['of_steps']} sampling steps by the public model `{finisher['model']}` "
            "(`dp_utils.training.generation.generate(..., finisher=public_transformer, "
            f"finisher_steps={finisher['last_steps']})`); the samples shown are made so."
        )
    notes += [f"Post-processing (no privacy cost): {step}." for step in report.get("post_processing", [])]
    return " ".join(notes)
