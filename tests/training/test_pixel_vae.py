"""The pixel-space pipeline's AutoencoderKL decodes to its input, also after save_pretrained/from_pretrained."""

import pytest
import torch
from diffusers import AutoencoderKL

from dp_utils.training.pixel_vae import identity_vae


@pytest.mark.parametrize("channels, size", [(1, 8), (3, 8), (3, 64)])
def test_decode_returns_the_input(tmp_path, channels, size):
    identity_vae(channels).save_pretrained(tmp_path)
    vae = AutoencoderKL.from_pretrained(tmp_path)
    assert vae.config.scaling_factor == 1.0
    x = torch.rand(2, channels, size, size, generator=torch.Generator().manual_seed(0)) * 3 - 1.5
    x[0, :, 0, 0] = 1.5  # the extreme pixel value
    decoded = vae.decode(x).sample
    assert decoded.shape == x.shape
    torch.testing.assert_close(decoded, x, rtol=0, atol=5e-6)
