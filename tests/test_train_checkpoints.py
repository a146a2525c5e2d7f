"""Checkpoints are complete or absent: a killed save loses nothing; `latest` skips what is not a checkpoint."""

import json
from pathlib import Path

import pytest
from accelerate import Accelerator
from test_train_dp_dit import pixel_args, run_in_process

from dp_utils.errors import UserError
from dp_utils.training.checkpoints import list_checkpoints, resolve_checkpoint, save_checkpoint


class OneProcess:
    """The part of an Accelerator that save_checkpoint uses; `save_state` writes two files, or fails between them."""

    is_main_process = True

    def __init__(self, fail: bool = False):
        self.fail = fail

    def wait_for_everyone(self):
        pass

    def save_state(self, output_dir):
        Path(output_dir).mkdir(parents=True, exist_ok=True)
        (Path(output_dir) / "model.safetensors").write_text("weights")
        if self.fail:
            raise OSError(28, "No space left on device")
        (Path(output_dir) / "optimizer.bin").write_text("optimizer")


TRAINED = dict(trainable="full", embedders="train", lora_rank=None, lora_alpha=None, lora_target_modules=None)


def test_latest_skips_temporary_and_foreign_folders(tmp_path):
    for name in ("checkpoint-2", "checkpoint-10", "checkpoint-best", "checkpoint-12.tmp", ".incomplete-checkpoint-14"):
        (tmp_path / name / "transformer").mkdir(parents=True)
        (tmp_path / name / "random_states_0.pkl").write_bytes(b"")
        (tmp_path / name / "trained.json").write_text(json.dumps(TRAINED))
    (tmp_path / "checkpoint-13").write_text("a file, not a checkpoint")
    assert [p.name for p in list_checkpoints(tmp_path)] == ["checkpoint-2", "checkpoint-10"]  # by step, not name
    assert resolve_checkpoint("latest", tmp_path, TRAINED) == tmp_path / "checkpoint-10"
    assert resolve_checkpoint("checkpoint-2", tmp_path, TRAINED) == tmp_path / "checkpoint-2"  # relative to output_dir
    with pytest.raises(UserError, match="no complete checkpoint-<step> folder"):
        resolve_checkpoint("latest", tmp_path / "empty", TRAINED)
    with pytest.raises(UserError, match="no such checkpoint folder"):
        resolve_checkpoint(str(tmp_path / "checkpoint-99"), tmp_path, TRAINED)
    with pytest.raises(UserError, match="was trained with --trainable full; this run has --trainable attention"):
        resolve_checkpoint("latest", tmp_path, {**TRAINED, "trainable": "attention"})
    (tmp_path / "checkpoint-10" / "random_states_0.pkl").unlink()
    with pytest.raises(UserError, match="is not a checkpoint of train_dp_dit.py"):
        resolve_checkpoint("latest", tmp_path, TRAINED)


def test_a_killed_save_keeps_the_previous_checkpoint(tmp_path):
    save_checkpoint(OneProcess(), tmp_path, 1, total_limit=1)
    with pytest.raises(OSError, match="No space left"):
        save_checkpoint(OneProcess(fail=True), tmp_path, 2, total_limit=1)
    assert list_checkpoints(tmp_path) == [tmp_path / "checkpoint-1"]  # not deleted before the new one was complete
    assert sorted(p.name for p in (tmp_path / "checkpoint-1").iterdir()) == ["model.safetensors", "optimizer.bin"]
    assert (tmp_path / ".incomplete-checkpoint-2").is_dir() and not (tmp_path / "checkpoint-2").exists()

    save_checkpoint(OneProcess(), tmp_path, 2, total_limit=1)  # the next save clears the leftover
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-2"]


def test_total_limit_keeps_the_newest_and_a_step_saved_again_is_replaced(tmp_path):
    for step in (1, 2, 3):
        save_checkpoint(OneProcess(), tmp_path, step, total_limit=2)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["checkpoint-2", "checkpoint-3"]
    (tmp_path / "checkpoint-3" / "stale.bin").write_text("from an earlier attempt")
    save_checkpoint(OneProcess(), tmp_path, 3, total_limit=None)
    assert sorted(p.name for p in (tmp_path / "checkpoint-3").iterdir()) == ["model.safetensors", "optimizer.bin"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-2", "checkpoint-3"]


def test_run_killed_while_saving_resumes_from_the_last_complete_checkpoint(
    tmp_path, pixel_pipeline, digits_cache, monkeypatch
):
    out = tmp_path / "out"
    flags = ["--noise_multiplier", 1, "--max_train_steps", 4, "--checkpointing_steps", 2]
    flags += ["--checkpoints_total_limit", 1, "--report_to", "none"]
    original = Accelerator.save_state

    def save_then_die_at_step_4(self, output_dir, **kwargs):
        if output_dir.endswith("-4"):
            Path(output_dir).mkdir(parents=True)
            (Path(output_dir) / "model.safetensors").write_bytes(b"half a file")
            raise KeyboardInterrupt  # the job is killed in the middle of the save
        return original(self, output_dir, **kwargs)

    monkeypatch.setattr(Accelerator, "save_state", save_then_die_at_step_4)
    with pytest.raises(KeyboardInterrupt):
        run_in_process(*pixel_args(pixel_pipeline, digits_cache, out, *flags))
    assert [p.name for p in list_checkpoints(out)] == ["checkpoint-2"]  # kept: the limit applies after a save
    (out / "checkpoint-best").mkdir()  # a user's own folder, not a step

    monkeypatch.setattr(Accelerator, "save_state", original)
    with pytest.raises(UserError, match="holds checkpoints of an unfinished run"):  # a fresh run would mix them
        run_in_process(*pixel_args(pixel_pipeline, digits_cache, out, *flags))
    run_in_process(*pixel_args(pixel_pipeline, digits_cache, out, *flags, "--resume_from_checkpoint", "latest"))
    assert json.loads((out / "privacy_report.json").read_text())["steps"] == 4
    assert sorted(p.name for p in out.iterdir() if "checkpoint" in p.name) == ["checkpoint-4", "checkpoint-best"]
