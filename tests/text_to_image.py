"""Tiny random PixArt and SD3 transformers, saved and loaded back as a user loads a Hub checkpoint, and batches."""

from __future__ import annotations

import torch
from diffusers import PixArtTransformer2DModel, SD3Transformer2DModel

import dp_utils

CAPTION_TOKENS = 5
PIXART = dict(
    sample_size=8,
    num_layers=2,
    patch_size=2,
    attention_head_dim=8,
    num_attention_heads=2,
    in_channels=4,
    out_channels=8,
    cross_attention_dim=16,
    caption_channels=12,
    norm_type="ada_norm_single",
    norm_elementwise_affine=False,
    norm_eps=1e-6,
    use_additional_conditions=False,
)
SD3 = dict(
    sample_size=8,
    patch_size=2,
    in_channels=4,
    out_channels=4,
    num_layers=2,
    attention_head_dim=8,
    num_attention_heads=2,
    joint_attention_dim=12,
    caption_projection_dim=16,
    pooled_projection_dim=10,
    qk_norm="rms_norm",
    dual_attention_layers=(0,),  # SD3.5's second self-attention in the first block
)
MODELS = {"pixart": (PixArtTransformer2DModel, PIXART), "sd3": (SD3Transformer2DModel, SD3)}


def tiny_transformer(kind: str, tmp_path, seed: int = 0, dtype=torch.float32):
    """A random transformer of `kind` with non-trivial tables and norm weights (they start at fixed values)."""
    cls, config = MODELS[kind]
    torch.manual_seed(seed)
    model = cls(**config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name or "scale_shift_table" in name:
                p.normal_(1.0, 0.3)
    path = tmp_path / f"{kind}-{seed}"
    model.save_pretrained(path)
    return cls.from_pretrained(path, torch_dtype=dtype).train()


def text_batch(kind: str, rows: int, seed: int = 1, dtype=torch.float32):
    """(latents, timesteps, prompt embeddings, mask or pooled embeddings, target) for `kind`."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, 4, 8, 8, generator=g, dtype=dtype)
    emb = torch.randn(rows, CAPTION_TOKENS, 12, generator=g, dtype=dtype)
    target = torch.randn(rows, 4, 8, 8, generator=g, dtype=dtype)
    if kind == "pixart":
        t = torch.randint(0, 1000, (rows,), generator=g)
        mask = (torch.arange(CAPTION_TOKENS) < torch.randint(1, CAPTION_TOKENS + 1, (rows, 1), generator=g)).long()
        return x, t, emb, mask, target
    t = torch.rand(rows, generator=g, dtype=dtype) * 1000
    pooled = torch.randn(rows, 10, generator=g, dtype=dtype)
    return x, t, emb, pooled, target


def text_losses(model, x, t, emb, extra, target, criterion=dp_utils.per_sample_mse):
    """Per-row losses of a PixArt (extra: the caption mask) or SD3 (extra: pooled embeddings) forward."""
    if isinstance(model, PixArtTransformer2DModel) or "PixArt" in type(model).__name__:
        out = model(
            x,
            encoder_hidden_states=emb,
            timestep=t,
            encoder_attention_mask=extra,
            added_cond_kwargs={"resolution": None, "aspect_ratio": None},
        ).sample[:, :4]
    else:
        out = model(hidden_states=x, encoder_hidden_states=emb, pooled_projections=extra, timestep=t).sample
    return criterion(out, target)


WORDS = "a an the photo picture of cat dog digit zero one two three red blue green small big on in with".split()


def tiny_t5(path, seed: int = 0, d_model: int = 12):
    """A 1-layer T5 encoder and a Unigram tokenizer over WORDS, saved under path/text_encoder*, path/tokenizer*."""
    from transformers import T5Config, T5EncoderModel, T5Tokenizer

    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -2.0)] + [("▁" + w, -1.0) for w in WORDS]
    torch.manual_seed(seed)
    config = T5Config(vocab_size=len(vocab), d_model=d_model, d_ff=16, d_kv=4, num_layers=1, num_heads=2)
    return T5EncoderModel(config), T5Tokenizer(vocab=vocab, extra_ids=0, model_max_length=512)


def tiny_clip(path, seed: int, hidden: int):
    """A 1-layer CLIP text encoder with projection and a BPE tokenizer over WORDS (merges spelled out)."""
    import json

    from transformers import CLIPTextConfig, CLIPTextModelWithProjection, CLIPTokenizer

    vocab, merges = {"<|startoftext|>": 0, "<|endoftext|>": 1}, []
    for word in WORDS:
        pieces = [*word[:-1], word[-1] + "</w>"]
        for piece in pieces:
            vocab.setdefault(piece, len(vocab))
        while len(pieces) > 1:
            merges.append(f"{pieces[0]} {pieces[1]}")
            pieces = [pieces[0] + pieces[1], *pieces[2:]]
            vocab.setdefault(pieces[0], len(vocab))
    path.mkdir(parents=True, exist_ok=True)
    (path / "vocab.json").write_text(json.dumps(vocab))
    (path / "merges.txt").write_text("#version: 0.2\n" + "\n".join(dict.fromkeys(merges)) + "\n")
    tokenizer = CLIPTokenizer(
        str(path / "vocab.json"), str(path / "merges.txt"), pad_token="<|endoftext|>", model_max_length=77
    )
    torch.manual_seed(seed)
    config = CLIPTextConfig(
        vocab_size=len(vocab),
        hidden_size=hidden,
        intermediate_size=16,
        num_hidden_layers=2,
        num_attention_heads=2,
        max_position_embeddings=77,
        projection_dim=hidden,
        bos_token_id=0,
        eos_token_id=1,
        pad_token_id=1,
    )
    return CLIPTextModelWithProjection(config), tokenizer


def tiny_vae(latent_channels: int = 4, **config):
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    return AutoencoderKL(
        block_out_channels=(8, 16),
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        layers_per_block=1,
        latent_channels=latent_channels,
        norm_num_groups=8,
        sample_size=16,
        **config,
    )


def tiny_text_pipeline(kind: str, path) -> None:
    """A whole tiny PixArt-Sigma or SD3 pipeline folder (16 px images, 8x8 latents), as on the Hub."""
    from diffusers import (
        DPMSolverMultistepScheduler,
        FlowMatchEulerDiscreteScheduler,
        PixArtSigmaPipeline,
        StableDiffusion3Pipeline,
    )

    torch.manual_seed(0)
    transformer = MODELS[kind][0](**MODELS[kind][1])
    t5, t5_tokenizer = tiny_t5(path / "tmp-t5")
    if kind == "pixart":
        scheduler = DPMSolverMultistepScheduler(beta_schedule="linear", beta_start=0.0001, beta_end=0.02)
        pipe = PixArtSigmaPipeline(t5_tokenizer, t5, tiny_vae(), transformer, scheduler)
    else:
        # pooled = 4 + 6 = pooled_projection_dim 10; joint = 4 + 6 + padding to T5's 12 = joint_attention_dim
        clip, clip_tokenizer = tiny_clip(path / "tmp-clip", 1, 4)
        clip_2, clip_tokenizer_2 = tiny_clip(path / "tmp-clip-2", 2, 6)
        vae = tiny_vae(shift_factor=0.1, scaling_factor=1.5)
        pipe = StableDiffusion3Pipeline(
            transformer,
            FlowMatchEulerDiscreteScheduler(shift=3.0),
            vae,
            clip,
            clip_tokenizer,
            clip_2,
            clip_tokenizer_2,
            t5,
            t5_tokenizer,
        )
    pipe.save_pretrained(path)
