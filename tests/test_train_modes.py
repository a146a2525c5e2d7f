"""train_dp_dit.py in Opacus' reference modes and with gradient checkpointing: the same clipped steps as flash_bk."""

import json

import pytest
import torch
from diffusers import DiTTransformer2DModel
from opacus.accountants import PRVAccountant
from test_train_dp_dit import pixel_args, run_in_process, transformer_weights

# Noise-free steps with every gradient clipped (C = 0.01), 16 images per logical batch in physical batches of 6, the
# same batches (--noise_seed): the weights depend only on the clipped sums, which every mode must compute alike.
CLIPPED = ["--noise_multiplier", 0, "--max_grad_norm", 0.01, "--max_train_steps", 2, "--embedders", "freeze"]
CLIPPED += ["--report_to", "none", "--checkpointing_steps", 0, "--noise_seed", 0]  # the same batches in every run


@pytest.fixture(scope="module")
def flash_bk_weights(tmp_path_factory, pixel_pipeline, digits_cache):
    out = tmp_path_factory.mktemp("flash_bk") / "out"
    run_in_process(*pixel_args(pixel_pipeline, digits_cache, out, *CLIPPED))
    return transformer_weights(out)


def assert_same_weights(expected, got, start):
    changed = [k for k in expected if expected[k].shape == start[k].shape and not torch.equal(expected[k], start[k])]
    assert len(changed) > 20  # the reference did train
    for k in expected:
        torch.testing.assert_close(got[k], expected[k], rtol=0, atol=1e-6, msg=k)


@pytest.mark.parametrize("mode", ["opacus_hooks", "opacus_ghost"])
def test_opacus_modes_train_like_flash_bk(tmp_path, pixel_pipeline, digits_cache, flash_bk_weights, mode):
    out = tmp_path / "out"
    run_in_process(*pixel_args(pixel_pipeline, digits_cache, out, *CLIPPED, "--grad_sample_mode", mode))
    start = DiTTransformer2DModel.from_pretrained(pixel_pipeline / "transformer").state_dict()
    start = {k: v for k, v in start.items() if k in flash_bk_weights}
    assert_same_weights(flash_bk_weights, transformer_weights(out), start)
    assert json.loads((out / "privacy_report.json").read_text())["grad_sample_mode"] == mode


def test_opacus_hooks_accounts_one_batch_per_step(tmp_path, pixel_pipeline, digits_cache):
    """Three physical batches per logical batch are one Poisson batch at q = 1/8 for the accountant, not q = 3/8."""
    out = tmp_path / "out"
    flags = ["--noise_multiplier", 1, "--max_train_steps", 2, "--grad_sample_mode", "opacus_hooks"]
    run_in_process(*pixel_args(pixel_pipeline, digits_cache, out, *flags, "--report_to", "none"))
    report = json.loads((out / "privacy_report.json").read_text())
    accountant = PRVAccountant()
    for _ in range(2):
        accountant.step(noise_multiplier=1.0, sample_rate=1 / 8)
    assert report["epsilon"] == pytest.approx(accountant.get_epsilon(delta=report["delta"]), rel=1e-6)


@pytest.fixture
def tf32_off():
    """TF32 off for the test, restored after (torch.backends' flags are not plain attributes monkeypatch can undo)."""
    before = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = before


def test_gradient_checkpointing_and_tf32_train_the_same_steps(
    tmp_path, pixel_pipeline, digits_cache, flash_bk_weights, monkeypatch, tf32_off
):
    checkpointed = []
    original = torch.utils.checkpoint.checkpoint

    def counting_checkpoint(*args, **kwargs):
        checkpointed.append(1)
        return original(*args, **kwargs)

    monkeypatch.setattr(torch.utils.checkpoint, "checkpoint", counting_checkpoint)
    out = tmp_path / "out"
    flags = [*CLIPPED, "--gradient_checkpointing", "--allow_tf32"]
    run_in_process(*pixel_args(pixel_pipeline, digits_cache, out, *flags))
    assert len(checkpointed) >= 2 * 2  # every block of every forward ran under torch.utils.checkpoint
    assert torch.backends.cuda.matmul.allow_tf32 and torch.backends.cudnn.allow_tf32
    start = DiTTransformer2DModel.from_pretrained(pixel_pipeline / "transformer").state_dict()
    start = {k: v for k, v in start.items() if k in flash_bk_weights}
    assert_same_weights(flash_bk_weights, transformer_weights(out), start)
