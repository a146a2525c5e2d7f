"""The engine on CUDA (skipped without a GPU): exact against the naive loop, bf16 products written out in fp32,
bf16 contributions within C, state on the model's device."""

import pytest
import torch
from oracle import dit_batch, dit_losses, naive_clipped_sum, private_update, relative_error, tiny_dit
from test_precision import clipped_contributions

from dp_utils.clipping.precision import matmul

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.mark.parametrize("mode", ["flash_bk", "flash"])
def test_dit_update_equals_naive_loop_on_cuda(tmp_path, mode):
    rows, max_grad_norm = 4, 0.05
    batch = tuple(b.cuda() for b in dit_batch(rows, dtype=torch.float64))
    expected, norms = naive_clipped_sum(
        tiny_dit(tmp_path, dtype=torch.float64).cuda(), dit_losses, batch, max_grad_norm, torch.arange(rows).cuda()
    )
    model = tiny_dit(tmp_path, dtype=torch.float64).cuda()
    update, engine_norms = private_update(model, dit_losses, batch, max_grad_norm, mode, rows)
    torch.testing.assert_close(engine_norms, norms, rtol=1e-10, atol=0)
    assert relative_error(update, {n: e / rows for n, e in expected.items()}) < 1e-10


def test_bf16_products_are_written_in_fp32_on_cuda():
    a, b = torch.randn(3, 64, 200, device="cuda").bfloat16(), torch.randn(3, 200, 64, device="cuda").bfloat16()
    product, error = matmul(a, b)
    assert product.dtype == torch.float32 and error == 0
    exact = a.double() @ b.double()
    torch.testing.assert_close(product.double(), exact, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("mode", ["flash_bk", "flash"])
def test_bf16_contributions_are_at_most_the_clipping_norm_on_cuda(tmp_path, mode):
    norms = clipped_contributions(tmp_path, mode, 1e-3, device="cuda")
    assert (norms <= 1e-3).all() and (norms >= 0.97e-3).all(), norms / 1e-3
