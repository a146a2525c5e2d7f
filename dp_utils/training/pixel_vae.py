"""An AutoencoderKL whose decoder is the identity, so that a pixel-space DiT saves as a plain DiTPipeline.

DiTPipeline always decodes with `vae.decode(latents / scaling_factor)`; a pixel-space model has nothing to decode.
Rather than custom code (which `from_pretrained` only runs with `trust_remote_code=True`), the pixel-space pipeline
gets a stock AutoencoderKL with scaling factor 1 whose weights make its decoder an identity:

- conv_in writes the channels (x, -x, K, -K) (a centre tap and a bias), with K = CONSTANT;
- every residual block's last convolution is zero, so each block returns its input (no attention block);
- the output GroupNorm has one group whose mean is exactly 0 (the channels cancel) and whose variance is
  (s + K^2) / (c + 1), for c image channels and s the image's mean over pixels of the squared channel values;
  its scale undoes the K^2 part, leaving x (1 + s / K^2)^(-1/2);
- conv_out takes silu(a) - silu(-a) = a, exactly, of the (x, -x) pair.

So decode(x) = x (1 + s / K^2)^(-1/2), off from x by at most |x| s / (2 K^2): below 5e-6 for three channels in
[-1.5, 1.5], far below one 8-bit level (tests/training/test_pixel_vae.py). The encoder is never used (the cache
holds pixels).
"""

from __future__ import annotations

import torch
from diffusers import AutoencoderKL

CONSTANT = 1024.0


def identity_vae(channels: int) -> AutoencoderKL:
    """A 1-block AutoencoderKL for `channels`-channel pixels in [-1, 1] whose `decode` returns its input."""
    width = 2 * channels + 2  # (x, -x, K, -K)
    vae = AutoencoderKL(
        in_channels=channels,
        out_channels=channels,
        latent_channels=channels,
        block_out_channels=(width,),
        layers_per_block=1,
        norm_num_groups=1,
        scaling_factor=1.0,
        force_upcast=False,
        mid_block_add_attention=False,
    )
    eye = torch.eye(channels)
    with torch.no_grad():
        for parameter in vae.parameters():
            parameter.zero_()
        for module in vae.modules():
            if isinstance(module, torch.nn.GroupNorm):
                module.weight.fill_(1.0)
        vae.post_quant_conv.weight[:, :, 0, 0] = eye
        decoder = vae.decoder
        decoder.conv_in.weight[:channels, :, 1, 1] = eye
        decoder.conv_in.weight[channels : 2 * channels, :, 1, 1] = -eye
        decoder.conv_in.bias[2 * channels :] = torch.tensor([CONSTANT, -CONSTANT])
        decoder.conv_norm_out.weight.fill_(CONSTANT * (2 / width) ** 0.5)
        decoder.conv_out.weight[:, :channels, 1, 1] = eye
        decoder.conv_out.weight[:, channels : 2 * channels, 1, 1] = -eye
    return vae
