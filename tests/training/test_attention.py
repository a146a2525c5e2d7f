"""--attention_backend: the same attention through diffusers' dispatcher; clipping exact with every backend here."""

import pytest
import torch
from oracle import dit_batch, dit_losses, naive_clipped_sum, private_update, relative_error, tiny_dit

from dp_utils.errors import UserError
from dp_utils.training.attention import set_attention_backend

CPU_BACKENDS = ["native", "_native_math", "_native_flash"]


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_every_backend_here_computes_the_same_attention(tmp_path, backend):
    model = tiny_dit(tmp_path).eval()
    x, t, y, _ = dit_batch(3)
    with torch.no_grad():
        before = model(x, timestep=t, class_labels=y).sample
        assert set_attention_backend(model, backend) == 2  # one attention per block
        after = model(x, timestep=t, class_labels=y).sample
    torch.testing.assert_close(after, before, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_clipping_is_exact_with_every_backend_here(tmp_path, backend):
    rows, max_grad_norm = 4, 0.05
    batch = dit_batch(rows, dtype=torch.float64)
    expected, norms = naive_clipped_sum(
        tiny_dit(tmp_path, dtype=torch.float64), dit_losses, batch, max_grad_norm, torch.arange(rows)
    )
    model = tiny_dit(tmp_path, dtype=torch.float64)
    set_attention_backend(model, backend)
    update, engine_norms = private_update(model, dit_losses, batch, max_grad_norm, "flash_bk", rows)
    torch.testing.assert_close(engine_norms, norms, rtol=1e-10, atol=0)
    assert relative_error(update, {n: e / rows for n, e in expected.items()}) < 1e-10


@pytest.mark.parametrize(
    "backend, message",
    [("flash", "runs on CUDA only"), ("_native_cudnn", "runs on CUDA only"), ("fast", "must be one of")],
)
def test_a_backend_that_cannot_run_here_is_refused_by_name(tmp_path, backend, message):
    with pytest.raises(UserError, match=message):
        set_attention_backend(tiny_dit(tmp_path), backend)
