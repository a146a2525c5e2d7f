"""Padding rows of fixed-shape physical batches: exactly zero loss, norm and contribution, also holding NaN or inf.

Each case runs a batch of real rows followed by padding rows whose inputs hold NaN and inf, with the mask, and
compares the update with the naive one-example loop over the real rows alone (float64), for every engine path:
the stacked fast path (flash_bk), the two-pass path (flash), activation checkpointing, noise multiplicity and LoRA.
"""

import pytest
import torch
from oracle import dit_batch, dit_losses, naive_clipped_sum, private_update, relative_error, tiny_dit

from dp_utils.errors import UserError

REAL, PADDING = 3, 2


def padded(batch, multiplicity: int = 1):
    """The real rows, then PADDING examples (x NaN / inf, noise NaN), each `multiplicity` rows; and the row mask."""
    x, t, y, noise = (b.clone() for b in batch)
    pad = PADDING * multiplicity
    x[-pad:] = float("nan")
    x[-1] = float("inf")
    noise[-pad:] = float("nan")
    mask = torch.arange(len(x)) < len(x) - pad
    return (x, t, y, noise), mask


def lora(model):
    from peft import LoraConfig, inject_adapter_in_model

    model.requires_grad_(False)
    model = inject_adapter_in_model(LoraConfig(r=4, lora_alpha=8, target_modules=["to_q", "to_v", "ff.net.2"]), model)
    torch.manual_seed(2)
    for name, p in model.named_parameters():
        if "lora_B" in name:  # peft starts B at zero: give the test a real gradient path
            p.data.normal_(0, 0.1)
    return model.double()


def checkpointed(model):
    model.enable_gradient_checkpointing()
    return model


CASES = {"full": lambda m: m, "lora": lora, "checkpointing": checkpointed}


@pytest.mark.parametrize("mode", ["flash_bk", "flash"])
@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("max_grad_norm", [1e-3, 1e3], ids=["all-clipped", "none-clipped"])
def test_padding_rows_contribute_exactly_nothing(tmp_path, mode, case, max_grad_norm):
    batch = dit_batch(REAL + PADDING, dtype=torch.float64)
    real = tuple(b[:REAL] for b in batch)
    expected, norms = naive_clipped_sum(
        CASES[case](tiny_dit(tmp_path, dtype=torch.float64)), dit_losses, real, max_grad_norm, torch.arange(REAL)
    )
    batch, mask = padded(batch)
    model = CASES[case](tiny_dit(tmp_path, dtype=torch.float64))
    update, engine_norms = private_update(model, dit_losses, batch, max_grad_norm, mode, REAL, mask=mask)
    assert all(torch.isfinite(u).all() for u in update.values())
    torch.testing.assert_close(engine_norms[:REAL], norms, rtol=1e-10, atol=0)
    assert torch.equal(engine_norms[REAL:], torch.zeros(PADDING, dtype=engine_norms.dtype))
    assert relative_error(update, {n: e / REAL for n, e in expected.items()}) < 1e-10


@pytest.mark.parametrize("mode", ["flash_bk", "flash"])
def test_padding_with_noise_multiplicity(tmp_path, mode):
    k = 2
    x, t, y, noise = dit_batch((REAL + PADDING) * k, dtype=torch.float64)
    x, y = x[: REAL + PADDING].repeat_interleave(k, 0), y[: REAL + PADDING].repeat_interleave(k, 0)
    groups = torch.arange(REAL).repeat_interleave(k)
    real = tuple(b[: REAL * k] for b in (x, t, y, noise))
    expected, norms = naive_clipped_sum(tiny_dit(tmp_path, dtype=torch.float64), dit_losses, real, 0.05, groups)
    batch, mask = padded((x, t, y, noise), multiplicity=k)
    update, engine_norms = private_update(
        tiny_dit(tmp_path, dtype=torch.float64), dit_losses, batch, 0.05, mode, REAL, noise_multiplicity=k, mask=mask
    )
    torch.testing.assert_close(engine_norms[:REAL], norms, rtol=1e-10, atol=0)
    assert not engine_norms[REAL:].any()
    assert relative_error(update, {n: e / REAL for n, e in expected.items()}) < 1e-10


def test_a_mask_of_the_wrong_shape_or_dtype_is_refused(tmp_path):
    model = tiny_dit(tmp_path)
    x, t, y, noise = dit_batch(4)
    with pytest.raises(UserError, match=r"mask must be a bool tensor of shape \(4,\)"):
        private_update(model, dit_losses, (x, t, y, noise), 1.0, "flash_bk", 4, mask=torch.ones(4))
