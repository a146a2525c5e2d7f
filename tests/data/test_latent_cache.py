"""dp_utils.data.latent_cache: image preprocessing, opening a cache, validating it against a DiT config, sampling."""

import json
import shutil

import datasets
import numpy as np
import pytest
import torch
from diffusers import DiTTransformer2DModel

from dp_utils.data.latent_cache import CACHE_INFO_NAME, LatentDataset, load_latent_cache, validate_latent_cache
from dp_utils.errors import UserError


def dit_config(**overrides) -> dict:
    """The config of a tiny real DiT: 4 latent channels, 16x16 latents, 2 classes unless overridden."""
    kwargs = dict(
        num_attention_heads=2,
        attention_head_dim=8,
        in_channels=4,
        out_channels=8,
        num_layers=1,
        sample_size=16,
        patch_size=2,
        num_embeds_ada_norm=2,
        norm_num_groups=8,
    )
    return DiTTransformer2DModel(**{**kwargs, **overrides}).config


def test_missing_cache_says_how_to_make_it(tmp_path):
    with pytest.raises(
        FileNotFoundError, match=rf"No finished latent cache at {tmp_path}.*precompute_latents\.py"
    ) as error:
        load_latent_cache(tmp_path)
    assert isinstance(error.value, UserError)  # a script reports it as `error: ...`, exit code 2


def test_metadata_is_exposed(photo_cache):
    data = LatentDataset(photo_cache, model_config=dit_config())
    assert len(data) == data.num_rows == 7
    assert data.conditional and data.num_classes == 2 and data.class_names == ["cat", "misc"]
    assert data.latent_shape == (4, 16, 16) and data.num_views == 2 and not data.pixel_space
    assert data.scaling_factor == pytest.approx(0.18215)
    assert data.info["skipped"][0]["source"] == "cat/truncated.jpg"


def test_samples_are_fresh_draws_around_the_mean(photo_cache):
    data = LatentDataset(photo_cache, random_flip=False)
    rows = datasets.load_from_disk(str(photo_cache)).with_format("numpy")[:]
    latent, label = data[4]
    assert latent.shape == (4, 16, 16) and latent.dtype == torch.float32
    assert label.dtype == torch.long and label.shape == () and label.item() == rows["label"][4]
    assert not torch.equal(data[4][0], data[4][0])  # a new noise draw on every access
    draws = torch.stack([data[4][0] for _ in range(400)])
    mean, std = torch.from_numpy(rows["mean"][4, 0]), torch.from_numpy(rows["std"][4, 0])
    assert ((draws.mean(0) - mean).abs() < 4 * std / 20).float().mean() > 0.99
    torch.manual_seed(3)
    first = data[2][0]
    torch.manual_seed(3)
    assert torch.equal(first, data[2][0])  # only torch's global RNG is used, so seeding reproduces it


def test_flip_choice_is_made_per_access(digits_cache):
    data = LatentDataset(digits_cache)  # pixels: no noise, so a sample is exactly one of the two views
    rows = datasets.load_from_disk(str(digits_cache)).with_format("numpy")[:]
    views = torch.from_numpy(rows["mean"][1])  # (2, 3, 8, 8)
    assert not torch.equal(views[0], views[1])
    samples = [data[1][0] for _ in range(40)]
    flipped = [torch.equal(x, views[1]) for x in samples]
    assert all(f or torch.equal(x, views[0]) for f, x in zip(flipped, samples, strict=True))
    assert 0 < sum(flipped) < 40
    unflipped = LatentDataset(digits_cache, random_flip=False)
    assert all(torch.equal(unflipped[1][0], views[0]) for _ in range(10))


def test_batches_from_a_dataloader(photo_cache):
    loader = torch.utils.data.DataLoader(LatentDataset(photo_cache), batch_size=4, shuffle=True)
    latents, labels = next(iter(loader))
    assert latents.shape == (4, 4, 16, 16) and labels.shape == (4,) and labels.dtype == torch.long


def test_wrong_channel_count_is_explained(photo_cache):
    with pytest.raises(
        UserError,
        match=r"4-channel latents .* model has in_channels=3\. Build the model with "
        r"in_channels=4",
    ):
        LatentDataset(photo_cache, model_config=dit_config(in_channels=3, out_channels=6))


def test_wrong_sample_size_is_explained(photo_cache):
    with pytest.raises(UserError, match=r"size 16x16 .* sample_size=32\. Build the model with sample_size=16"):
        LatentDataset(photo_cache, model_config={"in_channels": 4, "sample_size": 32, "num_embeds_ada_norm": 2})


def test_label_out_of_range_names_the_row(photo_cache):
    with pytest.raises(
        UserError,
        match=r"Row 3 of the cache \(source 'misc/astronaut_rgba\.png'\) has label 1 but "
        r"the model has num_embeds_ada_norm=1 classes.*num_embeds_ada_norm=2",
    ):
        LatentDataset(photo_cache, model_config=dit_config(num_embeds_ada_norm=1))


def test_unconditional_cache_yields_the_null_label(tmp_path, digits_cache):
    cache = tmp_path / "cache"
    shutil.copytree(digits_cache, cache)
    info = json.loads((cache / CACHE_INFO_NAME).read_text())
    rows, _ = load_latent_cache(cache)
    # Make the digits unconditional the way the script would have written them.
    rows.remove_columns("label").save_to_disk(str(tmp_path / "unlabelled"))
    shutil.copy(cache / CACHE_INFO_NAME, tmp_path / "unlabelled" / CACHE_INFO_NAME)
    info.update(conditional=False, class_names=None, num_classes=0, class_to_index=None)
    (tmp_path / "unlabelled" / CACHE_INFO_NAME).write_text(json.dumps(info))
    with pytest.raises(ValueError, match="unconditional .* pass null_label"):
        LatentDataset(tmp_path / "unlabelled")
    data = LatentDataset(tmp_path / "unlabelled", model_config=dit_config(in_channels=3, sample_size=8), null_label=2)
    assert data[5][1].item() == 2 and not data.conditional


def test_validate_accepts_a_matching_config(digits_cache):
    rows, info = load_latent_cache(digits_cache)
    validate_latent_cache(rows, info, {"in_channels": 3, "sample_size": 8, "num_embeds_ada_norm": 10})
    assert np.asarray(rows["label"][:5]).tolist() == [0, 1, 2, 3, 4]
