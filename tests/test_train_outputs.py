"""What the trainer shows and writes beyond the weights: --help, the model card, the Hub upload, data-loading flags."""

import json
import shutil
import subprocess
import sys

import pytest
import torch
from conftest import REPO_ROOT
from diffusers import DiTPipeline
from test_train_dp_dit import pixel_args, run_in_process, transformer_weights

import dp_utils.training.hub
from dp_utils.errors import UserError
from dp_utils.training.arguments import build_parser
from dp_utils.training.model_card import model_card

FAST = ["--noise_multiplier", 1.0, "--max_train_steps", 2, "--report_to", "none"]


def test_help_shows_every_default():
    result = subprocess.run(
        [sys.executable, str(REPO_ROOT / "train_dp_dit.py"), "--help"], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0
    assert "--grad_sample_mode {flash_bk,flash,opacus_ghost,opacus_hooks}" in result.stdout
    assert "(default: flash_bk)" in result.stdout and "(default: constant)" in result.stdout
    parser = build_parser("")
    formatter = parser._get_formatter()
    for action in parser._actions:
        if action.dest != "help" and not action.required:
            assert "default" in formatter._get_help_string(action), action.dest


def test_an_image_folder_given_as_the_cache_gets_the_precompute_command(tmp_path, pixel_pipeline, photo_dir):
    with pytest.raises(UserError, match=rf"{photo_dir} is an image folder.*--train_data_dir {photo_dir} --output_dir"):
        run_in_process(*pixel_args(pixel_pipeline, photo_dir, tmp_path / "out", *FAST))
    assert not (tmp_path / "out").exists()


def test_push_to_hub_uploads_the_model_but_never_checkpoints_or_logs(
    tmp_path, pixel_pipeline, digits_cache, monkeypatch
):
    """The real push_to_hub, with a local folder as the Hub: what it hands upload_folder is what a user downloads."""
    hub = tmp_path / "hub"

    def create_repo(repo_id, exist_ok, token):
        return type("RepoUrl", (), {"repo_id": f"user/{repo_id}"})

    def upload_folder(*, repo_id, folder_path, **kwargs):  # the Hub keeps every file of the folder it is given
        shutil.copytree(folder_path, hub / repo_id)

    monkeypatch.setenv("HF_TOKEN", "hf_local")  # read at call time by huggingface_hub.get_token
    monkeypatch.setattr(dp_utils.training.hub, "create_repo", create_repo)
    monkeypatch.setattr(dp_utils.training.hub, "upload_folder", upload_folder)
    out = tmp_path / "out"
    flags = [*FAST, "--checkpointing_steps", 1, "--report_to", "tensorboard", "--validation_steps", 2]
    run_in_process(*pixel_args(pixel_pipeline, digits_cache, out, *flags, "--push_to_hub"))
    assert (out / "checkpoint-1").is_dir() and list((out / "logs").rglob("*.tfevents.*"))  # kept locally
    uploaded = hub / "user/out"  # the output folder's name, as diffusers' scripts default it
    files = {p.relative_to(uploaded).as_posix() for p in uploaded.rglob("*") if p.is_file()}
    assert not [f for f in files if f.startswith(("checkpoint-", "logs/", ".upload-"))]
    assert {"model_index.json", "README.md", "privacy_report.json", "samples/step-000002.png"} <= files
    local = {p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file()}
    assert files == {f for f in local if not f.startswith(("checkpoint-", "logs/"))}
    pipe = DiTPipeline.from_pretrained(uploaded)
    assert pipe.get_label_ids(["3"]) == [3]
    assert "DiTPipeline.from_pretrained('user/out')" in (uploaded / "README.md").read_text()


def test_max_train_samples_sets_n_and_workers_build_the_same_batches(tmp_path, pixel_pipeline, digits_cache):
    flags = [*FAST, "--max_train_samples", 50, "--checkpointing_steps", 0, "--lr_scheduler", "cosine"]
    flags += ["--lr_warmup_steps", 1, "--noise_seed", 7]  # the same secret batches in both runs
    run_in_process(*pixel_args(pixel_pipeline, digits_cache, tmp_path / "main", *flags))
    workers = ["--dataloader_num_workers", 2]
    run_in_process(*pixel_args(pixel_pipeline, digits_cache, tmp_path / "workers", *flags, *workers))
    report = json.loads((tmp_path / "main" / "privacy_report.json").read_text())
    assert report["dataset_size"] == 50 and report["sample_rate"] == pytest.approx(1 / 4)  # ceil(50 / 16) steps
    assert report["delta"] == pytest.approx(1 / 500)
    expected, got = transformer_weights(tmp_path / "main"), transformer_weights(tmp_path / "workers")
    assert all(torch.equal(expected[k], got[k]) for k in expected)


REPORT = dict(
    epsilon=None,
    delta=1e-4,
    weak_delta_accepted=False,
    noise_multiplier=0.0,
    sample_rate=0.1,
    steps=10,
    dataset_size=1000,
    expected_batch_size=100.0,
    max_grad_norm=1e6,
    accountant="prv",
    trainable="full",
    trained_parameters=1000,
    total_parameters=1000,
    trained=["proj_out_2.weight"],
    frozen=[],
    fixed_rows=[],
    lora=None,
    noise_seed_given=False,
    private_metrics_logged=False,
)


def test_cards_of_from_scratch_and_non_private_runs_say_so():
    card = model_card(REPORT, base_model=None, class_names=None, grid=None, license="other", location="out")
    assert card.text.lstrip().startswith("# DiT trained from scratch without privacy (non-private baseline)")
    assert "no privacy guarantee" in card.text and "The guarantee covers" not in card.text
    assert "differential-privacy" not in card.data.tags and card.data.base_model is None
    private = model_card(
        {**REPORT, "epsilon": 8.0, "noise_multiplier": 1.1, "max_grad_norm": 1.0},
        base_model="facebook/DiT-XL-2-256",
        class_names=["people", "pets"],
        grid=None,
        license="cc-by-nc-4.0",
        location="me/dp-dit",
    )
    assert private.text.lstrip().startswith("# facebook/DiT-XL-2-256 fine-tuned with DP-SGD")
    assert "(8, 0.0001)-differential privacy" in private.text and "1: `pets`" in private.text
    assert "not the data the base model was trained on" in private.text
    assert "pipe.get_label_ids(['people'])" in private.text
    assert private.data.license == "cc-by-nc-4.0" and private.data.base_model == "facebook/DiT-XL-2-256"
