"""The engine in a training loop, measured exactly: bytes of live tensors (StorageTracker), matmul FLOPs by dtype and
ops that would make a GPU's host wait (OpCount), in fp32, bf16 autocast (layer norms in fp32, as CUDA runs them) and
with gradient checkpointing, against non-private training of the same model on the same batch."""

import contextlib

import pytest
import torch
from oracle import dit_batch, dit_losses, naive_clipped_sum, private_update, relative_error, tiny_dit
from torch.utils.data import DataLoader, TensorDataset

import dp_utils
from benchmarks.profiling import MatmulFlops, OpCount, StorageTracker, layer_norms_in_fp32

ROWS = 8
# DiT-S/2 blocks on 64 tokens (the FLOP ratios depend on width and tokens, not on depth), fewer of them
CONFIG = dict(num_attention_heads=6, attention_head_dim=64, num_layers=3, sample_size=16)


def training_loop(
    tmp_path, mode: str, bf16: bool = False, checkpointing: bool = False, multiplicity: int = 1, padding: int = 0
):
    """A step function over one batch that keeps the last loss and prediction bound, as training loops do; with
    noise multiplicity K, every image of the batch comes K times (K noise draws); the last `padding` rows of a
    private step are padding rows (zeros, False in the mask), as make_private's fixed-shape loader yields them."""
    model = tiny_dit(tmp_path, **CONFIG)
    if checkpointing:
        model.enable_gradient_checkpointing()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    criterion = dp_utils.per_sample_mse
    if mode != "non_private":
        loader = DataLoader(TensorDataset(torch.arange(ROWS // multiplicity)), batch_size=ROWS // multiplicity)
        model, optimizer, criterion, _ = dp_utils.make_private(
            module=model,
            optimizer=optimizer,
            data_loader=loader,
            noise_multiplier=1.0,
            max_grad_norm=1.0,
            grad_sample_mode=mode,
            poisson_sampling=False,
            noise_multiplicity=multiplicity,
        )
    x, t, y, noise = dit_batch(ROWS, size=16)
    x, y = (v[: ROWS // multiplicity].repeat_interleave(multiplicity, 0) for v in (x, y))
    x[ROWS - padding :], noise[ROWS - padding :] = 0, 0
    mask = {"mask": torch.arange(ROWS) < ROWS - padding} if padding and mode != "non_private" else {}
    state = {}

    def forward_and_backward():
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            state["prediction"] = model(x, timestep=t, class_labels=y).sample[:, :4]
            state["loss"] = criterion(state["prediction"], noise, **mask)
        (state["loss"].mean() if mode == "non_private" else state["loss"]).backward()

    def step(measure_host_syncs: OpCount | None = None):
        with measure_host_syncs or contextlib.nullcontext():
            forward_and_backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return model, step


def measure(tmp_path, mode: str, **setting) -> tuple[int, int, MatmulFlops]:
    """Peak bytes over two steps after a warm-up, bytes still alive after them, and one step's matmul FLOPs."""
    model, step = training_loop(tmp_path, mode, **setting)
    bf16 = setting.get("bf16", False)
    with layer_norms_in_fp32(model) if bf16 else contextlib.nullcontext():
        step()
        with StorageTracker() as tracker:
            step()
            step()
        with MatmulFlops() as flops:
            step()
    return tracker.peak, tracker.live, flops


SETTINGS = {
    "fp32": {},
    "fp32-padding": {"padding": 3},
    "bf16": {"bf16": True},
    "bf16-checkpointing": {"bf16": True, "checkpointing": True},
}


@pytest.mark.parametrize("mode", ["flash_bk", "flash"])
@pytest.mark.parametrize("setting", SETTINGS)
def test_step_peak_and_leftovers_match_non_private_training(tmp_path, setting, mode):
    peak, alive, _ = measure(tmp_path, "non_private", **SETTINGS[setting])
    private_peak, private_alive, _ = measure(tmp_path, mode, **SETTINGS[setting])
    assert private_peak <= 1.25 * peak, (private_peak / 2**20, peak / 2**20)
    # the loss and prediction the loop holds: nothing else (per-example norms are kept only when asked for)
    assert private_alive <= alive, (private_alive, alive)


def test_bf16_step_multiplies_in_bf16(tmp_path):
    _, _, flops = measure(tmp_path, "non_private", bf16=True)
    _, _, private_flops = measure(tmp_path, "flash_bk", bf16=True)
    assert flops.fraction(torch.float32, torch.float64) == 0
    assert private_flops.fraction(torch.float32, torch.float64) <= 0.05, dict(private_flops.by_dtype)
    assert private_flops.total <= 1.15 * flops.total


@pytest.mark.parametrize("mode", ["flash_bk", "flash"])
@pytest.mark.parametrize("setting", SETTINGS)
def test_forward_and_backward_never_wait_for_the_device(tmp_path, setting, mode):
    """No op that hands a device value to the host (item(), a boolean mask, ...) in the private forward and backward,
    where a GPU's host would stall once per layer; noise multiplicity 2, as the trainer runs it. (The optimizer's
    step reads one flag per logical batch, the non-finite check.)"""
    model, step = training_loop(tmp_path, mode, **SETTINGS[setting], multiplicity=2)
    count = OpCount()
    with layer_norms_in_fp32(model) if "bf16" in setting else contextlib.nullcontext():
        step()
        step(measure_host_syncs=count)
    assert count.ops > 0 and count.host_syncs() == {}, count.host_syncs()


@pytest.mark.parametrize("mode", ["flash_bk", "flash"])
def test_gradient_checkpointing_equals_naive_loop(tmp_path, mode):
    rows, max_grad_norm = 4, 0.05
    batch = dit_batch(rows, dtype=torch.float64)
    expected, norms = naive_clipped_sum(
        tiny_dit(tmp_path, dtype=torch.float64), dit_losses, batch, max_grad_norm, torch.arange(rows)
    )
    model = tiny_dit(tmp_path, dtype=torch.float64)
    model.enable_gradient_checkpointing()
    recomputed = []
    model.transformer_blocks[1].register_forward_pre_hook(lambda *args: recomputed.append(True))
    update, engine_norms = private_update(model, dit_losses, batch, max_grad_norm, mode, rows)
    assert len(recomputed) == 3  # the forward, then a recompute in each of the engine's two backward passes
    torch.testing.assert_close(engine_norms, norms, rtol=1e-10, atol=0)  # recomputed calls counted once
    assert relative_error(update, {n: e / rows for n, e in expected.items()}) < 1e-10
