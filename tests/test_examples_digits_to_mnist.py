"""The public -> private example's data split and metrics (examples/digits_to_mnist)."""

import argparse
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch
from diffusers import DiTPipeline

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT / "examples" / "digits_to_mnist"))
import evaluate  # noqa: E402


def test_prepare_data_splits_mnist_disjointly(tmp_path):
    subprocess.run(
        [sys.executable, str(REPO_ROOT / "examples/digits_to_mnist/prepare_data.py"), "--output_dir", str(tmp_path)],
        check=True,
        capture_output=True,
    )
    public, public_labels = evaluate.load_folder(tmp_path / "public")
    private, private_labels = evaluate.load_folder(tmp_path / "private")
    heldout, heldout_labels = evaluate.load_folder(tmp_path / "heldout")
    assert public.shape == (1797, 1, 16, 16) and private.shape == (4000, 1, 16, 16) and heldout.shape[0] == 1000
    assert (np.bincount(private_labels) == 400).all() and (np.bincount(heldout_labels) == 100).all()
    private_bytes = {image.numpy().tobytes() for image in private}
    assert not any(image.numpy().tobytes() in private_bytes for image in heldout)
    # The frame is MNIST's (a dark 2-pixel border) for both; the handwriting differs: scikit-learn's 4-bit digits,
    # upscaled from 8x8, have thicker strokes (more ink) than MNIST's.
    border = torch.ones(16, 16, dtype=torch.bool)
    border[2:-2, 2:-2] = False
    assert (public[:, 0, border] == 0).all() and private[:, 0, border].mean() < 0.01
    assert public.mean() > 1.2 * private.mean()


def test_frechet_distance_of_gaussians():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(20000, 3))
    b = rng.normal(size=(20000, 3)) * 2 + 1  # mean 1, std 2 per coordinate
    # closed form: |mu_a - mu_b|^2 + sum(s_a^2 + s_b^2 - 2 s_a s_b) = 3 + 3 * (1 + 4 - 4)
    assert abs(evaluate.frechet_distance(a, b) - 6.0) < 0.15
    assert abs(evaluate.frechet_distance(a, a)) < 1e-6
    features = np.maximum(rng.normal(size=(500, 64)), 0)
    features[:, :32] = 0  # dead ReLU units: a singular covariance
    assert abs(evaluate.frechet_distance(features, features)) < 1e-6


def test_shipped_public_model_is_the_config_and_samples_by_class_name():
    """The quickstart's public model loads as a Hub checkpoint would, with dit_small.json's architecture."""
    folder = REPO_ROOT / "examples/digits_to_mnist/public-model"
    pipe = DiTPipeline.from_pretrained(folder)
    config = json.loads((REPO_ROOT / "examples/digits_to_mnist/dit_small.json").read_text())
    config["num_embeds_ada_norm"] = 1000  # the label table is saved padded to DiTPipeline's 1000 class rows
    assert {k: pipe.transformer.config[k] for k in config if not k.startswith("_")} == {
        k: v for k, v in config.items() if not k.startswith("_")
    }
    report = json.loads((folder / "privacy_report.json").read_text())
    assert report["dataset_size"] == 1797 and report["epsilon"] is None  # public data, no noise
    images = pipe(class_labels=pipe.get_label_ids(["3", "7"]), num_inference_steps=2, output_type="np").images
    assert images.shape == (2, 16, 16, 3)


def test_evaluation_scores_the_finisher_a_report_recommends_or_the_ones_asked(tmp_path):
    plain, finished = tmp_path / "plain", tmp_path / "finished"
    for folder, recipe in (
        (plain, {"optimizer": "adamw"}),
        (finished, {"public_finisher": {"model": "pub", "last_steps": 5, "of_steps": 25}}),
    ):
        folder.mkdir()
        (folder / "privacy_report.json").write_text(json.dumps({"recipe": recipe}))
    args = argparse.Namespace(public_model=str(plain), finisher_steps=None, model_dirs=[str(plain), str(finished)])
    assert evaluate.scored_variants(args) == [(plain, None, 0), (finished, "pub", 5)]
    args.finisher_steps = [0, 3]  # asked: every model with each, the public model itself only unfinished
    assert evaluate.scored_variants(args) == [
        (plain, str(plain), 0),
        (finished, str(plain), 0),
        (finished, str(plain), 3),
    ]
