"""train_dp_dit.py refuses bad flags, paths and data before any compute: one message with the fix, exit code 2."""

import json
import os
import subprocess
import sys

import accelerate.utils
import pytest
from conftest import REPO_ROOT, free_port
from test_train_dp_dit import pixel_args, run_in_process

import train_dp_dit
from dp_utils.errors import UserError

BASE = ["--model_config", "DiT-S/2", "--latent_cache", "cache"]
BAD_FLAGS = [
    (["--noise_multiplier", "-1"], "--noise_multiplier must be finite and >= 0"),
    (["--noise_multiplier", "nan"], "--noise_multiplier must be finite and >= 0"),
    (["--noise_multiplier", "inf"], "--noise_multiplier must be finite and >= 0"),
    (["--noise_multiplier", "1", "--max_grad_norm", "nan"], "--max_grad_norm must be finite and > 0"),
    (["--noise_multiplier", "1", "--max_grad_norm", "inf"], "--max_grad_norm must be finite and > 0"),
    (["--noise_multiplier", "1", "--max_grad_norm", "0"], "--max_grad_norm must be finite and > 0"),
    (["--target_epsilon", "0"], "--target_epsilon must be finite and > 0"),
    (["--target_epsilon", "-1"], "--target_epsilon must be finite and > 0"),
    (["--target_epsilon", "nan"], "--target_epsilon must be finite and > 0"),
    (["--target_epsilon", "8", "--delta", "0"], r"--delta must be in \(0, 1\)"),
    (["--target_epsilon", "8", "--delta", "1"], r"--delta must be in \(0, 1\)"),
    (["--target_epsilon", "8", "--delta", "nan"], r"--delta must be in \(0, 1\)"),
    (["--noise_multiplier", "1", "--max_train_steps", "0"], "--max_train_steps must be >= 1, got 0"),
    (["--noise_multiplier", "1", "--num_train_epochs", "0"], "--num_train_epochs must be >= 1, got 0"),
    (["--noise_multiplier", "1", "--class_dropout_prob", "2"], r"--class_dropout_prob must be in \[0, 1\]"),
    (["--noise_multiplier", "1", "--class_dropout_prob", "-0.1"], r"--class_dropout_prob must be in \[0, 1\]"),
    (["--noise_multiplier", "1", "--num_validation_images", "0"], "--num_validation_images must be >= 1"),
    (["--noise_multiplier", "1", "--logical_batch_size", "0"], "--logical_batch_size must be >= 1"),
    (["--noise_multiplier", "1", "--validation_steps", "-1"], "--validation_steps must be >= 0"),
    (["--noise_multiplier", "1", "--checkpoints_total_limit", "0"], "--checkpoints_total_limit must be >= 1"),
    (["--noise_multiplier", "1", "--learning_rate", "nan"], "--learning_rate must be finite and > 0"),
    (["--noise_multiplier", "1", "--seed", "-1"], "--seed must be in"),
    (["--noise_multiplier", "1", "--noise_seed", "-1"], "--noise_seed must be >= 0"),
    (["--noise_multiplier", "1", "--mixed_precision", "fp16"], "fp16 is not supported.*Use --mixed_precision bf16"),
    (["--noise_multiplier", "1", "--grad_sample_mode", "opacus_ghost"], "opacus_ghost needs --embedders freeze"),
    (
        ["--noise_multiplier", "1", "--grad_sample_mode", "opacus_hooks", "--noise_multiplicity", "2"],
        "--noise_multiplicity > 1 needs --grad_sample_mode flash_bk or flash",
    ),
    (
        ["--noise_multiplier", "1", "--grad_sample_mode", "opacus_hooks", "--gradient_checkpointing"],
        "--gradient_checkpointing needs --grad_sample_mode flash_bk or flash",
    ),
    (["--noise_multiplier", "1", "--report_to", "tensorbord"], "--report_to tensorbord: not a tracker"),
    (
        ["--noise_multiplier", "1", "--overwrite_output_dir", "--resume_from_checkpoint", "latest"],
        "give only one",
    ),
]


@pytest.mark.parametrize("flags, message", BAD_FLAGS, ids=[" ".join(flags) for flags, _ in BAD_FLAGS])
def test_bad_flags_are_refused_by_name(flags, message):
    with pytest.raises(UserError, match=message):
        train_dp_dit.parse_args(BASE + flags)


def test_fp16_from_the_accelerate_config_is_refused(monkeypatch):
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "fp16")  # what `accelerate launch` passes from its config
    with pytest.raises(UserError, match="fp16 is not supported"):
        train_dp_dit.parse_args(BASE + ["--noise_multiplier", "1"])
    train_dp_dit.parse_args(BASE + ["--noise_multiplier", "1", "--mixed_precision", "bf16"])  # the flag wins


def test_a_tracker_that_is_not_installed_is_refused(monkeypatch):
    monkeypatch.setattr(accelerate.utils, "is_wandb_available", lambda: False)
    with pytest.raises(UserError, match="--report_to wandb: the wandb package is not installed"):
        train_dp_dit.parse_args(BASE + ["--noise_multiplier", "1", "--report_to", "wandb"])


def test_bad_paths_and_data_are_refused_before_anything_is_written(tmp_path, pixel_pipeline, digits_cache):
    out = tmp_path / "out"

    def refused(message, *flags, output_dir=out, pipeline=pixel_pipeline):
        with pytest.raises(UserError, match=message) as error:
            run_in_process(*pixel_args(pipeline, digits_cache, output_dir, "--report_to", "none", *flags))
        return str(error.value)

    budget = ["--noise_multiplier", 1]
    refused(r"--validation_classes \[10\] out of range: the cache has 10 classes", *budget, "--validation_classes", 10)
    refused(r"--delta 0.01 is not below 1/N = 0.00833.*--accept_weak_delta", *budget, "--delta", 0.01)
    refused("no complete checkpoint-<step> folder", *budget, "--resume_from_checkpoint", "latest")
    with pytest.raises(UserError):  # no noise reaches it: refused when the noise is calibrated, not hanging
        run_in_process(*pixel_args(pixel_pipeline, digits_cache, out, "--report_to", "none", "--target_epsilon", 1e-9))
    message = refused("no such folder", *budget, pipeline=tmp_path / "no_such_model")
    assert "huggingface.co" not in message
    (tmp_path / "empty").mkdir()
    refused("is not a DiT pipeline folder", *budget, pipeline=tmp_path / "empty")
    assert not out.exists()  # nothing half-written by any of them

    file = tmp_path / "a_file"
    file.write_text("keep me")
    refused("is a file: give a folder", *budget, output_dir=file)
    refused("is a file, not a folder", *budget, output_dir=file / "out")
    assert file.read_text() == "keep me"

    unfinished = tmp_path / "unfinished"
    (unfinished / "checkpoint-3").mkdir(parents=True)
    refused(
        "holds checkpoints of an unfinished run: add --resume_from_checkpoint latest", *budget, output_dir=unfinished
    )
    finished = tmp_path / "finished"
    finished.mkdir()
    (finished / "privacy_report.json").write_text('{"steps": 7}')
    refused("holds a finished run.*--overwrite_output_dir", *budget, output_dir=finished)
    assert [p.name for p in finished.iterdir()] == ["privacy_report.json"]


def test_model_config_that_is_no_preset_or_file_is_refused(tmp_path, digits_cache):
    args = ["--model_config", tmp_path / "dit.json", "--latent_cache", digits_cache, "--noise_multiplier", 1]
    with pytest.raises(UserError, match="is neither a preset .*DiT-S/2.* nor a config.json file"):
        run_in_process(*args, "--output_dir", tmp_path / "out", "--report_to", "none")


def test_overwrite_output_dir_replaces_a_finished_run(tmp_path, pixel_pipeline, digits_cache):
    out = tmp_path / "out"
    (out / "checkpoint-7").mkdir(parents=True)
    (out / "privacy_report.json").write_text('{"steps": 7}')
    (out / "README.md").write_text("old model card")
    (out / "notes.txt").write_text("not ours")
    run_in_process(
        *pixel_args(pixel_pipeline, digits_cache, out, "--noise_multiplier", 1, "--max_train_steps", 1),
        "--overwrite_output_dir",
        "--report_to",
        "none",
        "--checkpointing_steps",
        0,
    )
    assert json.loads((out / "privacy_report.json").read_text())["steps"] == 1
    assert not (out / "checkpoint-7").exists()  # the old run's checkpoints would mislead `latest`
    assert "old model card" not in (out / "README.md").read_text()
    assert (out / "notes.txt").read_text() == "not ours"


def test_weak_delta_is_stated_and_warnings_precede_training(tmp_path, pixel_pipeline, digits_cache, capfd):
    out = tmp_path / "out"
    flags = ["--noise_multiplier", 1, "--max_train_steps", 1, "--delta", 0.01, "--accept_weak_delta"]
    flags += ["--logical_batch_size", 200, "--max_physical_batch_size", 60, "--report_to", "none"]
    run_in_process(*pixel_args(pixel_pipeline, digits_cache, out, *flags))
    log = capfd.readouterr().err
    first_step = log.index("DP steps")
    for warning in ("--logical_batch_size 200 >= N = 120: every step uses every image (q = 1)", "delta = 0.01 >= 1/N"):
        assert -1 < log.find(warning) < first_step
    assert -1 < log.find("Only 120 images") < first_step
    report = json.loads((out / "privacy_report.json").read_text())
    assert report["weak_delta_accepted"] and report["delta"] == 0.01 and report["sample_rate"] == 1
    assert "**A weak guarantee**: delta is at least 1/N = 1/120" in (out / "README.md").read_text()


def test_non_finite_loss_stops_before_the_update(tmp_path, pixel_pipeline, digits_cache):
    out = tmp_path / "out"
    flags = ["--noise_multiplier", 1, "--max_train_steps", 3, "--learning_rate", 1e30, "--checkpointing_steps", 1]
    with pytest.raises(UserError, match=r"loss is nan at step 2.*learning rate too high \(--learning_rate 1e\+30"):
        run_in_process(*pixel_args(pixel_pipeline, digits_cache, out, *flags, "--report_to", "none"))
    assert (out / "checkpoint-1").is_dir() and not (out / "checkpoint-2").exists()  # step 2 never stepped
    assert not (out / "privacy_report.json").exists()


def bad_run_command(pipeline, cache, out):
    return ["--report_to", "none", *map(str, pixel_args(pipeline, cache, out, "--noise_multiplier", 1))]


def test_script_prints_one_error_line_and_exits_2(tmp_path, pixel_pipeline, digits_cache):
    command = [sys.executable, str(REPO_ROOT / "train_dp_dit.py"), *bad_run_command(pixel_pipeline, digits_cache, "o")]
    result = subprocess.run(
        [*command, "--validation_classes", "12"], capture_output=True, text=True, cwd=tmp_path, timeout=300
    )
    assert result.returncode == 2
    assert result.stderr.splitlines()[-1] == (
        "error: --validation_classes [12] out of range: the cache has 10 classes (0 to 9)."
    )
    assert "Traceback" not in result.stderr and not (tmp_path / "o").exists()


def test_accelerate_launch_shows_the_childs_message_last(tmp_path, pixel_pipeline, digits_cache):
    """One process with `-q`: the message is the last line. Two: every rank prints it, the summary repeats it."""
    port = free_port()
    script = [str(REPO_ROOT / "train_dp_dit.py"), *bad_run_command(pixel_pipeline, digits_cache, "o")]
    script += ["--max_grad_norm", "nan"]
    message = "error: --max_grad_norm must be finite and > 0, got nan: pass a clipping norm such as 1.0."
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1"}
    common = ["--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port"]
    one = ["accelerate", "launch", "-q", "--cpu", "--num_processes", "1", *common, str(port), *script]
    result = subprocess.run(one, capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300)
    assert result.returncode != 0 and result.stderr.splitlines()[-1] == message
    assert "Traceback" not in result.stderr

    two = ["accelerate", "launch", "--multi_gpu", "--num_processes", "2", *common, str(port), *script]
    result = subprocess.run(two, capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300)
    lines = result.stderr.splitlines()
    # Each rank prints it, unless torchrun stopped it first, when the other rank failed a moment earlier.
    assert result.returncode != 0 and lines.count(message) in (1, 2)
    assert f"traceback : {message}" in "\n".join(lines[-6:])  # torchrun's closing summary, instead of a docs link
    assert not (tmp_path / "o").exists()
