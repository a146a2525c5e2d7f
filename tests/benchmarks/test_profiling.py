"""The measuring tools the engine's memory and precision tests rely on count what they claim."""

import torch
from torch import nn

from benchmarks.profiling import MatmulFlops, OpCount, StorageTracker, layer_norms_in_fp32


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
    assert count.by_name == {"t": 1, "mm": 1, "sum": 1} and count.host_syncs() == {}


def test_op_count_names_the_ops_that_wait_for_the_device():
    x = torch.randn(3, 4)
    with OpCount() as count:
        x.sum().item()
        bool((x > 0).any())
        x[x > 0]  # data-dependent shapes
        x.repeat_interleave(torch.tensor([1, 2, 1]), dim=0)
        x[torch.tensor([0, 2])]  # an index without a mask: no wait
    assert count.host_syncs() == {"_local_scalar_dense": 2, "index_by_mask": 1, "repeat_interleave": 1}


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
