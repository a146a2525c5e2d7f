"""The trainer's secrets and releases: fresh noise every run, --noise_seed, nothing secret outside checkpoints,
private metrics only on request, the global batch size across processes."""

import json

import torch
import yaml
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from test_train_dp_dit import launch, pixel_args, run_in_process, transformer_weights

from dp_utils.privacy.randomness import REPRODUCIBLE_NOISE_WARNING, DPRandomness
from dp_utils.privacy.sampling import PoissonBatchSampler

NOISE_SEED = 918273645


def _scalars(out) -> dict[str, list[float]]:
    """Every scalar series the TensorBoard tracker wrote under out/logs."""
    series = {}
    for events in (out / "logs").rglob("events.out.tfevents.*"):
        accumulator = EventAccumulator(str(events.parent))
        accumulator.Reload()
        for tag in accumulator.Tags()["scalars"]:
            series[tag] = [event.value for event in accumulator.Scalars(tag)]
    return series


def _secret_state(checkpoint) -> dict:
    """The DPRandomness state a checkpoint holds (one of accelerate's custom_checkpoint_*.pkl)."""
    for path in checkpoint.glob("custom_checkpoint_*.pkl"):
        state = torch.load(path, weights_only=False)
        if isinstance(state, dict) and "sampling_seed" in state:
            return state
    raise AssertionError(f"no noise generator state in {checkpoint}")


def test_same_flags_and_seed_give_fresh_noise_unless_noise_seed(tmp_path, pixel_pipeline, digits_cache, capsys):
    flags = ["--noise_multiplier", 1.0, "--max_train_steps", 2, "--report_to", "none"]
    for name in ("a", "b"):
        run_in_process(*pixel_args(pixel_pipeline, digits_cache, tmp_path / name, *flags))
    first, second = transformer_weights(tmp_path / "a"), transformer_weights(tmp_path / "b")
    assert any(not torch.equal(first[k], second[k]) for k in first)  # --seed 3 both times, different noise
    assert "Reproducible noise" not in (tmp_path / "a" / "README.md").read_text()

    for name in ("c", "d"):
        run_in_process(*pixel_args(pixel_pipeline, digits_cache, tmp_path / name, *flags, "--noise_seed", 11))
    first, second = transformer_weights(tmp_path / "c"), transformer_weights(tmp_path / "d")
    assert all(torch.equal(first[k], second[k]) for k in first)
    assert REPRODUCIBLE_NOISE_WARNING in capsys.readouterr().err  # the trainer's log handler writes to stderr
    assert "**Reproducible noise**" in (tmp_path / "c" / "README.md").read_text()
    report = json.loads((tmp_path / "c" / "privacy_report.json").read_text())
    assert report["noise_seed_given"] is True and "holds only while that seed stays" in report["noise_source"]


def _files_outside_checkpoints(out):
    return [p for p in out.rglob("*") if p.is_file() and not any(part.startswith("checkpoint-") for part in p.parts)]


def test_no_seed_or_generator_state_outside_checkpoints_and_no_private_metrics_by_default(
    tmp_path, pixel_pipeline, digits_cache
):
    out = tmp_path / "out"
    flags = ["--noise_multiplier", 1.0, "--max_train_steps", 2, "--checkpointing_steps", 1, "--validation_steps", 2]
    run_in_process(*pixel_args(pixel_pipeline, digits_cache, out, *flags, "--noise_seed", NOISE_SEED))
    secret = _secret_state(out / "checkpoint-2")
    assert secret["sampling_seed"] == DPRandomness(NOISE_SEED).sampling_seed  # resume rebuilds the same batches
    mt_words = secret["noise_generator"][24 : 24 + 8 * 624].numpy().tobytes()
    needles = [str(NOISE_SEED).encode(), NOISE_SEED.to_bytes(8, "little"), str(secret["sampling_seed"]).encode()]
    needles += [mt_words[i : i + 64] for i in range(0, len(mt_words), 512)]  # pieces of the generator state
    files = _files_outside_checkpoints(out)
    assert any(p.name == "hparams.yml" for p in files) and any(p.name == "privacy_report.json" for p in files)
    for path in files:
        content = path.read_bytes()
        assert not any(needle in content for needle in needles), path
        assert "random_states" not in path.name and "custom_checkpoint" not in path.name
    hparams = yaml.safe_load(next(p for p in files if p.name == "hparams.yml").read_text())
    assert "seed" not in hparams and "noise_seed" not in hparams and "max_grad_norm" in hparams  # public flags only
    scalars = _scalars(out)
    assert {"lr", "epsilon"} <= set(scalars) and not {"loss", "batch"} & set(scalars)
    card = (out / "README.md").read_text()
    assert "treated as public metadata" in card and "as secret as the training images" in card
    assert "were logged (`--log_private_metrics`)" not in card


def test_private_metrics_on_request_give_the_global_batch_of_two_processes(tmp_path, pixel_pipeline, digits_cache):
    out = tmp_path / "out"
    flags = ["--noise_multiplier", 1.0, "--max_train_steps", 4, "--logical_batch_size", 8, "--noise_seed", 5]
    result = launch(
        pixel_args(pixel_pipeline, digits_cache, out, *flags, "--log_private_metrics", "--report_to", "tensorboard"),
        tmp_path,
        processes=2,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    scalars = _scalars(out)
    report = json.loads((out / "privacy_report.json").read_text())
    sampler = PoissonBatchSampler(report["dataset_size"], report["sample_rate"], 4, DPRandomness(5).sampling_seed)
    assert scalars["batch"] == [len(sampler.indices_at(step)) for step in range(4)]  # both ranks' rows, not 2x one
    assert len(scalars["loss"]) == 4 and report["private_metrics_logged"] is True
    assert "loss=" in result.stderr
    assert "were logged (`--log_private_metrics`)" in (out / "README.md").read_text()
