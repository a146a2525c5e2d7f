"""The learned-variance half of DiT's output: which rows of proj_out_2 carry it, and that they stay fixed."""

import torch
from oracle import dit_batch, tiny_dit
from peft import LoraConfig

from dp_utils.training.adapters import add_lora
from dp_utils.training.variance import keep_rows_fixed, variance_row_indices, variance_rows


def test_variance_rows_are_the_rows_unpatchify_reads_as_variance_channels(tmp_path):
    model = tiny_dit(tmp_path, dtype=torch.float64).eval()
    x, t, y, _ = dit_batch(2, dtype=torch.float64)
    variance = variance_row_indices(patch_size=2, out_channels=8, channels=4)
    noise = torch.tensor([r for r in range(32) if r not in variance.tolist()])
    with torch.no_grad():
        before = model(x, timestep=t, class_labels=y).sample
        for rows, unchanged, changed in ((variance, slice(0, 4), slice(4, 8)), (noise, slice(4, 8), slice(0, 4))):
            model.proj_out_2.bias[rows] += 1.0
            after = model(x, timestep=t, class_labels=y).sample
            model.proj_out_2.bias[rows] -= 1.0
            assert torch.equal(after[:, unchanged], before[:, unchanged])
            assert (after[:, changed] != before[:, changed]).all()


def test_rows_of_lora_b_on_the_head_and_none_without_learned_variance(tmp_path):
    model = tiny_dit(tmp_path)
    model.requires_grad_(False)
    add_lora(model, LoraConfig(r=2, target_modules=["proj_out_2"]))
    fixed = variance_rows(model, channels=4)
    assert [f.param for f in fixed] == [model.proj_out_2.lora_B["default"].weight]  # the base layer is frozen
    assert variance_rows(tiny_dit(tmp_path, out_channels=4), channels=4) == []


def test_fixed_rows_survive_noise_adam_and_weight_decay(tmp_path):
    model = tiny_dit(tmp_path)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1, weight_decay=0.5)
    fixed = variance_rows(model, channels=4)
    keep_rows_fixed(optimizer, fixed)
    before = model.proj_out_2.weight.detach().clone()
    for _ in range(3):
        for p in model.parameters():
            p.grad = torch.randn_like(p)  # noise reaches every row, as DP-SGD's would
        optimizer.step()
    rows = fixed[0].rows
    assert torch.equal(model.proj_out_2.weight[rows], before[rows])
    assert optimizer.state[model.proj_out_2.weight]["exp_avg"][rows].eq(0).all()  # Adam never saw their noise
    others = torch.tensor([r for r in range(32) if r not in rows.tolist()])
    assert (model.proj_out_2.weight[others] != before[others]).all()
