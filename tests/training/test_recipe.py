"""A run with every lever: the privacy report's recipe and the model card name what was used."""

import json

import pytest
from test_train_dp_dit import pixel_args, run_in_process

from dp_utils.errors import UserError


def test_report_and_card_name_the_levers(tmp_path, pixel_pipeline, digits_cache):
    public = tmp_path / "public"  # a checkpoint whose class ids are the digits', as the quickstart's public model
    run_in_process(*pixel_args(pixel_pipeline, digits_cache, public, "--noise_multiplier", 0, "--max_train_steps", 1))
    out = tmp_path / "dp"
    levers = ["--optimizer", "dp_adambc", "--timestep_min", 200, "--augmentation", "shift", "--noise_multiplicity", 2]
    sampling = ["--public_finisher_steps", 1, "--num_inference_steps", 3, "--validation_steps", 2]
    run_in_process(
        *pixel_args(public, digits_cache, out, "--target_epsilon", 8, "--max_train_steps", 2, *levers, *sampling)
    )
    report = json.loads((out / "privacy_report.json").read_text())
    recipe = report["recipe"]
    sigma_c_over_b = report["noise_multiplier"] * report["max_grad_norm"] / report["expected_batch_size"]
    assert recipe["optimizer"] == "dp_adambc"
    assert recipe["dp_adambc_noise_variance"] == pytest.approx(sigma_c_over_b**2, rel=1e-12)
    assert recipe["timestep_range"] == [200, 999] and recipe["augmentation"] == "shift"
    assert recipe["views_per_image"] == 2 and report["noise_multiplicity"] == 2
    assert recipe["public_finisher"] == {"model": str(public), "last_steps": 1, "of_steps": 3}
    card = (out / "README.md").read_text()
    assert "DP-AdamBC" in card and "Trained on diffusion timesteps 200 to 999 only" in card
    assert "2 shifted views of each image" in card
    assert f"the last 1 of 3 sampling steps by the public model `{public}`" in card


def test_a_finisher_with_other_classes_is_refused_before_training(tmp_path, pixel_pipeline, digits_cache):
    out = tmp_path / "out"
    with pytest.raises(UserError, match="class ids are not the dataset's"):
        run_in_process(
            *pixel_args(pixel_pipeline, digits_cache, out, "--noise_multiplier", 1, "--public_finisher_steps", 2)
        )
    assert not (out / "privacy_report.json").exists()
