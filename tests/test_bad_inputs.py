"""A sweep of bad inputs to both scripts, by class: damaged files, folders that are not what a flag names, paths that
cannot be written, flags --help offers that cannot run, the Hub without a token or network.

Each must end the script the same way: exit code 2, the last line of stderr `error: ...`, no traceback, no training
step taken, nothing written where the script writes.
"""

import os
import shutil
import subprocess
import sys

import huggingface_hub.constants
import pytest
import torch
from conftest import REPO_ROOT, run_precompute
from diffusers.optimization import get_scheduler
from test_train_dp_dit import pixel_args

import dp_utils.data.encoding
import train_dp_dit
from dp_utils.data.latent_cache import load_latent_cache
from dp_utils.errors import run_script
from dp_utils.training.arguments import LR_SCHEDULERS, build_parser

TOO_LONG = "x" * 300  # a folder name no common file system accepts
STEPS = ["--noise_multiplier", 1, "--max_train_steps", 2, "--report_to", "none"]


def truncate(path):
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def refused(capfd, main, argv, written) -> str:
    """Run a script's entry point as `__main__` does; check the refusal; its message."""
    code = run_script(lambda: main([str(a) for a in argv]))
    err = capfd.readouterr().err
    last = err.strip().splitlines()[-1] if err.strip() else ""
    assert code == 2 and last.startswith("error: "), err[-3000:]
    assert "Traceback" not in err and "DP steps" not in err, err[-3000:]  # no traceback, no training step
    assert not written.exists(), f"{written} was written"
    return last


def train(argv):
    train_dp_dit.main(train_dp_dit.parse_args(argv))


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory, pixel_pipeline, digits_cache):
    """checkpoint-1 of a full and of a LoRA run (2 steps each)."""
    root = tmp_path_factory.mktemp("checkpoints")
    for trainable in ("full", "lora"):
        out = root / trainable
        train([*map(str, pixel_args(pixel_pipeline, digits_cache, out, *STEPS, "--checkpointing_steps", 1)),
               "--trainable", trainable])  # fmt: skip
    return root


def damaged_copy(source, tmp_path, name, damage):
    copy = tmp_path / "damaged"
    shutil.copytree(source, copy)
    damage(copy / name) if name else damage(copy)
    return copy


DAMAGED_CACHE = {
    "rows missing": ("data-00000-of-00001.arrow", lambda p: p.unlink()),
    "rows truncated": ("data-00000-of-00001.arrow", truncate),
    "metadata truncated": ("cache_info.json", truncate),
    "metadata without its keys": ("cache_info.json", lambda p: p.write_text('{"format_version": 1}')),
    "dataset state missing": ("state.json", lambda p: p.unlink()),
    "dataset info truncated": ("dataset_info.json", truncate),
}


@pytest.mark.parametrize("case", DAMAGED_CACHE)
def test_a_damaged_latent_cache_is_refused(tmp_path, capfd, pixel_pipeline, digits_cache, case):
    cache = damaged_copy(digits_cache, tmp_path, *DAMAGED_CACHE[case])
    out = tmp_path / "out"
    message = refused(capfd, train, pixel_args(pixel_pipeline, cache, out, *STEPS), out)
    assert f"The latent cache at {cache} is damaged" in message and "--overwrite_output_dir" in message


def test_resume_from_what_is_not_a_checkpoint_of_this_run_is_refused(
    tmp_path, capfd, pixel_pipeline, digits_cache, checkpoints
):
    out = tmp_path / "out"

    def resume(checkpoint, *flags):
        argv = pixel_args(pixel_pipeline, digits_cache, out, *STEPS, "--resume_from_checkpoint", checkpoint, *flags)
        return refused(capfd, train, argv, out)

    for folder in (pixel_pipeline, digits_cache, tmp_path):
        assert "is not a checkpoint of train_dp_dit.py" in resume(folder)
    full, lora = checkpoints / "full/checkpoint-1", checkpoints / "lora/checkpoint-1"
    assert "was trained with --trainable full" in resume(full, "--trainable", "lora")
    assert "was trained with --trainable full" in resume(full, "--trainable", "attention")
    assert "was trained with --trainable lora" in resume(lora)
    assert "was trained with --lora_rank 4" in resume(lora, "--trainable", "lora", "--lora_rank", 8)
    assert "--embedders train" in resume(full, "--embedders", "freeze")
    for name in ("custom_checkpoint_0.pkl", "transformer/diffusion_pytorch_model.safetensors"):
        damaged = damaged_copy(full, tmp_path / name.replace("/", "_"), name, truncate)
        assert "cannot be loaded into this run" in resume(damaged)
    assert sorted(p.name for p in full.iterdir()) == sorted(p.name for p in lora.iterdir())  # untouched


def test_an_unwritable_output_logging_or_cache_folder_is_refused(tmp_path, capfd, pixel_pipeline, digits_cache):
    out = tmp_path / "out"
    argv = pixel_args(pixel_pipeline, digits_cache, out / TOO_LONG, *STEPS)
    assert f"--output_dir {out / TOO_LONG} cannot be created" in refused(capfd, train, argv, out)
    for flag in ("--logging_dir", "--cache_dir"):
        argv = [*pixel_args(pixel_pipeline, digits_cache, out, *STEPS), flag, tmp_path / TOO_LONG]
        if flag == "--logging_dir":
            argv += ["--report_to", "tensorboard"]
        assert f"{flag} {tmp_path / TOO_LONG} cannot be created or written" in refused(capfd, train, argv, out)


def test_a_damaged_model_is_refused(tmp_path, capfd, pixel_pipeline, digits_cache):
    out = tmp_path / "out"
    for k, (name, damage) in enumerate(
        [
            ("transformer/config.json", truncate),
            ("transformer/diffusion_pytorch_model.safetensors", truncate),
            ("transformer/diffusion_pytorch_model.safetensors", lambda p: p.unlink()),
            ("scheduler/scheduler_config.json", truncate),
        ]
    ):
        pipeline = damaged_copy(pixel_pipeline, tmp_path / str(k), name, damage)
        assert "cannot be loaded" in refused(capfd, train, pixel_args(pipeline, digits_cache, out, *STEPS), out)
    config = tmp_path / "dit.json"
    config.write_text('{"sample_size": 8,')
    argv = ["--model_config", config, "--latent_cache", digits_cache, "--output_dir", out, *STEPS]
    assert "is not a DiT config" in refused(capfd, train, argv, out)


def test_bad_choices_and_values_are_one_line(tmp_path, capfd, pixel_pipeline, digits_cache):
    out = tmp_path / "out"
    for flags in (["--trainable", "everything"], ["--lr_scheduler", "piecewise_constant"], ["--max_train_steps", "x"]):
        message = refused(capfd, train, [*pixel_args(pixel_pipeline, digits_cache, out, *STEPS), *flags], out)
        assert message.endswith("(see --help)")
    argv = [*pixel_args(pixel_pipeline, digits_cache, out, *STEPS), "--dataloader_num_workers", 10**6]
    assert "each worker is a process" in refused(capfd, train, argv, out)  # not a million processes
    assert "the following arguments are required" in refused(capfd, train, ["--output_dir", out], out)


@pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA graphs run here")
def test_cuda_graphs_without_cuda_are_refused(tmp_path, capfd, pixel_pipeline, digits_cache):
    out = tmp_path / "out"
    argv = [*pixel_args(pixel_pipeline, digits_cache, out, *STEPS), "--cuda_graphs"]
    assert "needs a CUDA device" in refused(capfd, train, argv, out)


def test_every_lr_scheduler_help_offers_runs_with_the_default_flags():
    parser = build_parser("")
    offered = next(a for a in parser._actions if a.dest == "lr_scheduler").choices
    assert offered == LR_SCHEDULERS and "piecewise_constant" not in offered
    defaults = parser.parse_args(["--model_config", "DiT-S/2", "--latent_cache", "c", "--noise_multiplier", "1"])
    for name in offered:
        optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=defaults.learning_rate)
        schedule = get_scheduler(name, optimizer, num_warmup_steps=defaults.lr_warmup_steps, num_training_steps=3)
        for _ in range(3):
            optimizer.step()
            schedule.step()


def test_push_to_hub_without_a_token_is_refused_first(tmp_path, capfd, monkeypatch, pixel_pipeline, digits_cache):
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_TOKEN_PATH", str(tmp_path / "no_token"))
    out = tmp_path / "out"
    message = refused(capfd, train, [*pixel_args(pixel_pipeline, digits_cache, out, *STEPS), "--push_to_hub"], out)
    assert "--push_to_hub needs a Hub token: run `hf auth login`" in message


@pytest.mark.parametrize(
    "env, message",
    [
        ({"HF_HUB_OFFLINE": "1"}, "HF_HUB_OFFLINE is set"),
        ({"HF_ENDPOINT": "http://127.0.0.1:9"}, "could not create or reach the Hub repository out"),  # nobody there
    ],
    ids=["offline", "no network"],
)
def test_push_to_hub_without_network_is_refused_first(tmp_path, pixel_pipeline, digits_cache, env, message):
    argv = [sys.executable, REPO_ROOT / "train_dp_dit.py", *pixel_args(pixel_pipeline, digits_cache, "out", *STEPS)]
    env = {**os.environ, "HF_TOKEN": "hf_not_a_real_token", "HF_HUB_ETAG_TIMEOUT": "2", **env}
    result = subprocess.run(
        [*map(str, argv), "--push_to_hub"], capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300
    )
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-3000:]
    assert result.stderr.strip().splitlines()[-1].startswith("error: ") and message in result.stderr
    assert not (tmp_path / "out").exists()


def precompute(argv):
    run_precompute(argv)


def test_precompute_refuses_what_it_cannot_write_or_read(tmp_path, capfd, digits_dataset_dir, tiny_vae_path):
    out = tmp_path / "cache"
    pixels = ["--vae", "none", "--resolution", 8]
    digits = ["--dataset_name", digits_dataset_dir, *pixels]
    assert "--output_dir" in refused(capfd, precompute, [*digits, "--output_dir", out / TOO_LONG], out)
    argv = [*digits, "--output_dir", out, "--cache_dir", tmp_path / TOO_LONG]
    assert "--cache_dir" in refused(capfd, precompute, argv, out)
    dataset = damaged_copy(digits_dataset_dir, tmp_path / "dataset", "data-00000-of-00001.arrow", truncate)
    argv = ["--dataset_name", dataset, *pixels, "--output_dir", out]
    assert "Could not load split 'train'" in refused(capfd, precompute, argv, out)
    vae = damaged_copy(tiny_vae_path, tmp_path / "vae", "diffusion_pytorch_model.safetensors", truncate)
    argv = ["--dataset_name", digits_dataset_dir, "--vae", vae, "--resolution", 8, "--output_dir", out]
    assert f"--vae {vae}: {vae} cannot be loaded" in refused(capfd, precompute, argv, out)


def test_precompute_replaces_a_damaged_cache_only_when_asked(tmp_path, capfd, digits_dataset_dir, digits_cache):
    argv = ["--dataset_name", digits_dataset_dir, "--vae", "none", "--resolution", 8, "--random_flip"]
    for name in ("data-00000-of-00001.arrow", "cache_info.json"):
        cache = damaged_copy(digits_cache, tmp_path / name, name, truncate)
        before = {p.name: p.read_bytes() for p in cache.iterdir()}
        message = refused(capfd, precompute, [*argv, "--output_dir", cache], tmp_path / "nothing")
        assert "damaged" in message and "--overwrite_output_dir" in message
        assert {p.name: p.read_bytes() for p in cache.iterdir()} == before  # nothing touched
        run_precompute([*argv, "--output_dir", cache, "--overwrite_output_dir"])
        assert load_latent_cache(cache)[0]["mean"] == load_latent_cache(digits_cache)[0]["mean"]  # encoded again


def test_precompute_encodes_a_damaged_shard_again(tmp_path, digits_dataset_dir, monkeypatch):
    """A killed run left shards; one was damaged since: the rerun encodes it again instead of failing."""
    argv = ["--dataset_name", digits_dataset_dir, "--vae", "none", "--resolution", 8, "--shard_size", 40]
    real, calls = dp_utils.data.encoding.to_model_input, []

    def crash_in_third_shard(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(dp_utils.data.encoding, "to_model_input", crash_in_third_shard)
    with pytest.raises(KeyboardInterrupt):
        run_precompute([*argv, "--output_dir", tmp_path / "cache"])
    shards = tmp_path / "cache/shards"
    truncate(next((shards / "00000").glob("*.arrow")))
    (shards / "00001.done.json").write_text("{")
    monkeypatch.setattr(dp_utils.data.encoding, "to_model_input", real)
    run_precompute([*argv, "--output_dir", tmp_path / "cache"])
    run_precompute([*argv, "--output_dir", tmp_path / "fresh"])
    resumed, fresh = load_latent_cache(tmp_path / "cache")[0], load_latent_cache(tmp_path / "fresh")[0]
    assert resumed["source"] == fresh["source"] and resumed["mean"] == fresh["mean"]
