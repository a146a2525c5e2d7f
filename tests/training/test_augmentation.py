"""Augmentation multiplicity: K shifted views of an image are K rows of one example, clipped together to C."""

import pytest
import torch
from oracle import dit_batch, dit_losses, naive_clipped_sum, private_update, relative_error, tiny_dit

from dp_utils.training.augmentation import augment, shift_views


def test_each_view_is_a_shift_of_its_image_with_repeated_edges():
    images = torch.randn(6, 3, 8, 8, dtype=torch.float64)
    views = shift_views(images, generator=torch.Generator().manual_seed(0))
    padded = torch.nn.functional.pad(images, (1, 1, 1, 1), mode="replicate")
    for image, view in zip(padded, views, strict=True):
        crops = [image[:, dy : dy + 8, dx : dx + 8] for dy in range(3) for dx in range(3)]
        assert any(torch.equal(view, crop) for crop in crops)
    assert torch.equal(augment(images, "none"), images)


def test_views_differ_between_rows():
    image = torch.randn(1, 1, 8, 8).expand(64, 1, 8, 8)
    views = shift_views(image, generator=torch.Generator().manual_seed(0))
    assert len({tuple(v.flatten().tolist()) for v in views}) > 1


@pytest.mark.parametrize("max_grad_norm", [1e-3, 1e3], ids=["all-clipped", "none-clipped"])
def test_augmented_views_are_clipped_as_one_example(tmp_path, max_grad_norm):
    """Each example's K views sum to one gradient clipped to C (float64 oracle: one example at a time)."""
    examples, k = 3, 4
    x, t, y, noise = dit_batch(examples * k, dtype=torch.float64)
    torch.manual_seed(0)
    x = shift_views(x[:examples].repeat_interleave(k, 0))  # K augmented views of each image
    y = y[:examples].repeat_interleave(k, 0)
    batch, group_ids = (x, t, y, noise), torch.arange(examples).repeat_interleave(k)
    expected, norms = naive_clipped_sum(
        tiny_dit(tmp_path, dtype=torch.float64), dit_losses, batch, max_grad_norm, group_ids
    )
    update, engine_norms = private_update(
        tiny_dit(tmp_path, dtype=torch.float64),
        dit_losses,
        batch,
        max_grad_norm,
        "flash_bk",
        examples,
        noise_multiplicity=k,
    )
    assert engine_norms.shape == (examples,)
    assert relative_error(update, {n: e / examples for n, e in expected.items()}) < 1e-10
    # each example's whole contribution (its K views together) is at most C
    for example in range(examples):
        rows = (group_ids == example).nonzero().flatten()
        contribution, _ = naive_clipped_sum(
            tiny_dit(tmp_path, dtype=torch.float64),
            dit_losses,
            tuple(b[rows] for b in batch),
            max_grad_norm,
            torch.zeros(k, dtype=torch.long),
        )
        total = torch.sqrt(sum(c.pow(2).sum() for c in contribution.values()))
        assert total <= max_grad_norm * (1 + 1e-12)
