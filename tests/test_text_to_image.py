"""Captioned images -> precompute_latents.py --caption_column -> train_dp_dit.py -> PixArtSigmaPipeline /
StableDiffusion3Pipeline.from_pretrained, on tiny pipelines whose text encoders and tokenizers are built offline."""

import json
import shutil

import numpy as np
import pytest
import torch
from conftest import run_precompute
from diffusers import PixArtSigmaPipeline, StableDiffusion3Pipeline
from PIL import Image
from sklearn.datasets import load_digits
from test_train_dp_dit import launch, run_in_process
from text_to_image import tiny_text_pipeline

from dp_utils.data.captions import CaptionedLatents
from dp_utils.errors import UserError
from dp_utils.training.adapters import load_lora_weights
from dp_utils.training.batches import physical_batch_keys
from dp_utils.training.text_to_image import CaptionedBatchDataset

NAMES = "zero one two three".split()
PIPELINES = {"pixart": PixArtSigmaPipeline, "sd3": StableDiffusion3Pipeline}
TOKENS = 8  # --max_sequence_length
FP16 = 2**-10  # float16's relative precision


@pytest.fixture(scope="session")
def text_pipelines(tmp_path_factory):
    root = tmp_path_factory.mktemp("text_pipelines")
    for kind in PIPELINES:
        tiny_text_pipeline(kind, root / kind)
    return {kind: root / kind for kind in PIPELINES}


@pytest.fixture(scope="session")
def captioned_digits(tmp_path_factory):
    """12 scikit-learn digits as PNGs with a metadata.jsonl of captions, as diffusers' imagefolder reads them."""
    digits = load_digits()
    root = tmp_path_factory.mktemp("captioned_digits")
    lines = []
    for k in range(12):
        pixels = np.rint(digits.images[k] * 255 / 16).astype(np.uint8)
        Image.fromarray(pixels).resize((16, 16)).save(root / f"{k:02d}.png")
        caption = f"a picture of digit {NAMES[digits.target[k] % 4]}" if k % 5 else ""  # some without a caption
        lines.append(json.dumps({"file_name": f"{k:02d}.png", "text": caption}))
    (root / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    return root


def precompute_args(folder, pipeline, out):
    return [
        "--train_data_dir",
        folder,
        "--caption_column",
        "text",
        "--pretrained_model_name_or_path",
        pipeline,
        "--resolution",
        16,
        "--random_flip",
        "--max_sequence_length",
        TOKENS,
        "--output_dir",
        out,
    ]


@pytest.fixture(scope="session")
def text_caches(tmp_path_factory, text_pipelines, captioned_digits):
    root = tmp_path_factory.mktemp("text_caches")
    for kind, pipeline in text_pipelines.items():
        run_precompute(precompute_args(captioned_digits, pipeline, root / kind))
    return {kind: root / kind for kind in PIPELINES}


@pytest.mark.parametrize("kind", PIPELINES)
def test_cache_rows_hold_the_pipelines_encoding_of_their_caption(kind, text_pipelines, text_caches, captioned_digits):
    dataset = CaptionedLatents(text_caches[kind])
    captions = [json.loads(line)["text"] for line in (captioned_digits / "metadata.jsonl").read_text().splitlines()]
    pipe = PIPELINES[kind].from_pretrained(text_pipelines[kind], transformer=None, vae=None)
    if kind == "pixart":
        embeds, mask, _, _ = pipe.encode_prompt(captions, False, max_sequence_length=TOKENS)
        pooled = [None] * len(captions)
        lengths = mask.sum(1).tolist()  # only the caption's tokens are kept
    else:
        embeds, _, pooled, _ = pipe.encode_prompt(
            captions, None, None, do_classifier_free_guidance=False, max_sequence_length=TOKENS
        )
        lengths = [embeds.shape[1]] * len(captions)  # SD3 attends to its padding: all tokens kept
    assert len(dataset) == len(captions)
    assert len(set(lengths)) == (1 if kind == "sd3" else 2)  # PixArt: 1 token ("") or 6 (5 words, end)
    for row in range(len(dataset)):
        latent, row_embeds, row_pooled = dataset[row]
        assert latent.shape == (4, 8, 8)
        # stored in float16: equal up to one float16 rounding (the batch's float32 sums may round either way)
        torch.testing.assert_close(row_embeds, embeds[row, : lengths[row]], rtol=FP16, atol=1e-6)
        if pooled[row] is not None:
            torch.testing.assert_close(row_pooled, pooled[row], rtol=FP16, atol=1e-6)
    assert captions[0] == ""  # what caption dropout puts in place of a caption: the encoding of ""
    torch.testing.assert_close(dataset.empty_prompt[0], embeds[0, : lengths[0]], rtol=FP16, atol=1e-6)


def test_edited_caption_changes_the_input(tmp_path, text_pipelines, captioned_digits):
    folder = tmp_path / "digits"
    shutil.copytree(captioned_digits, folder)
    out = tmp_path / "cache"
    run_precompute(precompute_args(folder, text_pipelines["pixart"], out))
    lines = (folder / "metadata.jsonl").read_text().splitlines()
    lines[1] = json.dumps({"file_name": "01.png", "text": "a red cat"})
    (folder / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    with pytest.raises(UserError, match="finished cache of a different input"):
        run_precompute(precompute_args(folder, text_pipelines["pixart"], out))


def test_caption_errors_before_anything_is_written(tmp_path, text_pipelines, captioned_digits, pixel_pipeline):
    out = tmp_path / "cache"
    bare = tmp_path / "bare"
    bare.mkdir()
    shutil.copy(captioned_digits / "00.png", bare / "00.png")
    with pytest.raises(UserError, match="metadata.jsonl is missing"):
        run_precompute(precompute_args(bare, text_pipelines["pixart"], out))
    (bare / "metadata.jsonl").write_text(json.dumps({"file_name": "00.png", "caption": "a cat"}) + "\n")
    with pytest.raises(UserError, match="line 1: expected a JSON object with 'file_name' and 'text'"):
        run_precompute(precompute_args(bare, text_pipelines["pixart"], out))
    args = precompute_args(captioned_digits, text_pipelines["pixart"], out)
    with pytest.raises(UserError, match="needs --pretrained_model_name_or_path"):
        run_precompute(args[:4] + args[6:] + ["--vae", "none"])
    assert not out.exists()


def test_caption_dropout_uses_the_empty_captions_encoding(text_caches):
    dataset = CaptionedLatents(text_caches["sd3"])
    keys = list(physical_batch_keys([list(range(6))], 0, 6))
    kept = CaptionedBatchDataset(dataset, 0.0, seed=0, rank=0)[keys[0]]
    dropped = CaptionedBatchDataset(dataset, 1.0, seed=0, rank=0)[keys[0]]
    for row in range(6):
        assert torch.equal(kept.prompt_embeds[row], dataset[row][1])
        assert torch.equal(dropped.prompt_embeds[row], dataset.empty_prompt[0])
        assert torch.equal(dropped.pooled[row], dataset.empty_prompt[1].float())
    assert torch.equal(kept.latents, dropped.latents)  # the same draws of the latents: only captions differ


def train_args(pipeline, cache, out, *extra):
    return [
        "--pretrained_model_name_or_path",
        pipeline,
        "--latent_cache",
        cache,
        "--output_dir",
        out,
        "--logical_batch_size",
        4,
        "--max_physical_batch_size",
        3,
        "--max_train_steps",
        2,
        "--noise_multiplier",
        1.0,
        "--seed",
        3,
        *extra,
    ]


def sample(pipe, kind):
    options = {"use_resolution_binning": False} if kind == "pixart" else {}
    images = pipe(
        "a picture of digit one",
        num_inference_steps=2,
        height=16,
        width=16,
        output_type="pt",
        max_sequence_length=TOKENS,
        generator=torch.Generator().manual_seed(0),
        **options,
    ).images
    assert images.shape == (1, 3, 16, 16) and torch.isfinite(images).all()
    return images


def test_pixart_full_run_loads_as_its_pipeline_and_samples(tmp_path, text_pipelines, text_caches):
    out = tmp_path / "out"
    flags = [
        "--use_ema",
        "--validation_steps",
        2,
        "--validation_prompts",
        "a picture of digit two",
        "",
        "--num_validation_images",
        2,
        "--num_inference_steps",
        2,
    ]
    result = launch(train_args(text_pipelines["pixart"], text_caches["pixart"], out, *flags), tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    pipe = PixArtSigmaPipeline.from_pretrained(out)
    base = PixArtSigmaPipeline.from_pretrained(text_pipelines["pixart"])
    assert not torch.equal(pipe.transformer.scale_shift_table, base.transformer.scale_shift_table)  # trained
    assert not torch.equal(sample(pipe, "pixart"), sample(base, "pixart"))
    assert (out / "samples" / "step-000002.png").is_file()
    card = (out / "README.md").read_text()
    assert "(image, caption) pair" in card and "PixArtSigmaPipeline.from_pretrained" in card
    report = json.loads((out / "privacy_report.json").read_text())
    assert report["steps"] == 2 and report["dataset_size"] == 12


def test_sd3_lora_on_two_processes_loads_with_load_lora_weights(tmp_path, text_pipelines, text_caches):
    out = tmp_path / "out"
    flags = ["--trainable", "lora", "--noise_multiplicity", 2]
    result = launch(train_args(text_pipelines["sd3"], text_caches["sd3"], out, *flags), tmp_path, processes=2)
    assert result.returncode == 0, result.stderr[-3000:]
    assert json.loads((out / "privacy_report.json").read_text())["world_size"] == 2
    pipe = StableDiffusion3Pipeline.from_pretrained(text_pipelines["sd3"])
    before = sample(pipe, "sd3")
    pipe.load_lora_weights(out)
    assert any("lora" in n for n, _ in pipe.transformer.named_parameters())
    assert not torch.equal(sample(pipe, "sd3"), before)
    assert "pipe.load_lora_weights(" in (out / "README.md").read_text()


@pytest.mark.parametrize("kind, trainable", [("pixart", "lora"), ("sd3", "full")])
def test_other_modes_in_process(tmp_path, text_pipelines, text_caches, kind, trainable):
    out = tmp_path / "out"
    run_in_process(
        *train_args(text_pipelines[kind], text_caches[kind], out, "--trainable", trainable, "--report_to", "none")
    )
    if trainable == "lora":
        pipe = PIPELINES[kind].from_pretrained(text_pipelines[kind])
        load_lora_weights(pipe.transformer, out)  # PixArt pipelines have no LoRA loader
    else:
        pipe = PIPELINES[kind].from_pretrained(out)
    sample(pipe, kind)


def test_text_cache_refuses_another_pipeline(tmp_path, text_pipelines, text_caches):
    with pytest.raises(UserError, match="captions were encoded by a PixArtSigmaPipeline"):
        run_in_process(
            *train_args(text_pipelines["sd3"], text_caches["pixart"], tmp_path / "out", "--report_to", "none")
        )
    with pytest.raises(UserError, match="give --validation_prompts|samples --validation_prompts"):
        run_in_process(
            *train_args(
                text_pipelines["pixart"],
                text_caches["pixart"],
                tmp_path / "out",
                "--report_to",
                "none",
                "--validation_steps",
                1,
            )
        )
    assert not (tmp_path / "out").exists()


def test_resumed_run_equals_uninterrupted_one(tmp_path, text_pipelines, text_caches):
    flags = ["--checkpointing_steps", 1, "--use_ema", "--report_to", "none"]
    full, resumed = tmp_path / "full", tmp_path / "resumed"
    run_in_process(*train_args(text_pipelines["sd3"], text_caches["sd3"], full, *flags))
    shutil.copytree(full / "checkpoint-1", resumed / "checkpoint-1")
    run_in_process(
        *train_args(text_pipelines["sd3"], text_caches["sd3"], resumed, *flags, "--resume_from_checkpoint", "latest")
    )
    expected, got = (StableDiffusion3Pipeline.from_pretrained(d).transformer.state_dict() for d in (full, resumed))
    assert all(torch.equal(expected[k], got[k]) for k in expected)  # same batches, noise, draws, caption dropout
    reports = [json.loads((d / "privacy_report.json").read_text()) for d in (full, resumed)]
    assert reports[0] == reports[1]
