"""The measuring tools the engine's memory and precision tests rely on count what they claim."""

import torch
from torch import nn

from dp_utils.profiling import MatmulFlops, OpCount, StorageTracker, layer_norms_in_fp32


def test_storage_tracker_counts_live_bytes_and_the_peak():
    with StorageTracker() as tracker:
        a = torch.zeros(1000)  # 4000 bytes
        view = a.view(10, 100)  # an alias: no new storage
        b = a * 2  # 4000 more
        assert tracker.live == 8000
        del b
        assert tracker.live == 4000 and tracker.peak == 8000
        tracker.reset_peak()
        assert tracker.peak == 4000
    del a, view
    assert tracker.live == 0


def test_matmul_flops_are_counted_by_operand_dtype():
    x, w = torch.randn(8, 16), torch.randn(4, 16)
    with MatmulFlops() as flops:
        nn.functional.linear(x, w)  # 2 * 8 * 16 * 4
        with torch.autocast("cpu", dtype=torch.bfloat16):
            nn.functional.linear(x, w)
    assert flops.by_dtype == {torch.float32: 1024, torch.bfloat16: 1024}
    assert flops.fraction(torch.float32) == 0.5


def test_op_count_counts_every_dispatched_op():
    x = torch.randn(3, 4)
    with OpCount() as count:
        y = x.t()  # a view: one op
        (y @ x).sum()  # mm and sum (a 2-D @ is one mm)
    assert count.ops == 3


def test_layer_norms_compute_in_fp32_under_autocast_as_on_cuda():
    model = nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4))
    x = torch.randn(2, 4)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert model(x).dtype == torch.bfloat16  # CPU autocast: the linear's bf16 output goes through in bf16
        with layer_norms_in_fp32(model):
            out = model(x)
        assert model(x).dtype == torch.bfloat16  # restored
        hidden = model[0](x)
    assert out.dtype == torch.float32
    expected = nn.functional.layer_norm(hidden.float(), (4,), model[1].weight, model[1].bias)
    torch.testing.assert_close(out, expected)
