"""The obviously correct, slow reference: one example at a time, clip its whole gradient, sum; and tiny DiTs."""

from __future__ import annotations

import torch
from diffusers import DiTTransformer2DModel
from torch.utils.data import DataLoader, TensorDataset

import dp_utils


def tiny_dit(tmp_path, seed: int = 0, dtype=torch.float32, **config) -> DiTTransformer2DModel:
    """A small random DiT saved with save_pretrained and loaded back as a user loads a Hub checkpoint."""
    torch.manual_seed(seed)
    settings = dict(
        num_attention_heads=2,
        attention_head_dim=8,
        in_channels=4,
        out_channels=8,
        num_layers=2,
        sample_size=8,
        patch_size=2,
        num_embeds_ada_norm=10,
    )
    settings.update(config)
    path = tmp_path / f"dit-{seed}"
    DiTTransformer2DModel(**settings).save_pretrained(path)
    model = DiTTransformer2DModel.from_pretrained(path, torch_dtype=dtype).train()  # loaded in eval mode
    for module in model.modules():  # label dropout draws differ between batched and one-at-a-time forwards
        if hasattr(module, "dropout_prob"):
            module.dropout_prob = 0.0
    return model


def dit_batch(rows: int, seed: int = 1, dtype=torch.float32, size: int = 8, classes: int = 10):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, 4, size, size, generator=g, dtype=dtype)
    t = torch.randint(0, 1000, (rows,), generator=g)
    y = torch.randint(0, classes, (rows,), generator=g)
    noise = torch.randn(rows, 4, size, size, generator=g, dtype=dtype)
    return x, t, y, noise


def dit_losses(model, x, t, y, noise, criterion=dp_utils.per_sample_mse):
    """Per-row diffusion losses on the noise half of DiT's 8 output channels."""
    return criterion(model(x, timestep=t, class_labels=y).sample[:, :4], noise)


def naive_clipped_sum(model, losses_fn, batch, max_grad_norm: float, group_ids: torch.Tensor):
    """sum_e clip(grad of sum of example e's row losses), each example in its own forward and backward."""
    params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    total = {n: torch.zeros_like(p) for n, p in params}
    norms = []
    for example in torch.unique(group_ids):
        rows = (group_ids == example).nonzero().flatten()
        model.zero_grad(set_to_none=True)
        losses_fn(model, *(b[rows] for b in batch)).sum().backward()
        grads = {n: p.grad if p.grad is not None else torch.zeros_like(p) for n, p in params}
        norm = torch.sqrt(sum(g.pow(2).sum() for g in grads.values()))
        norms.append(norm)
        factor = min(1.0, max_grad_norm / (norm.item() + 1e-6))
        for n in total:
            total[n] += factor * grads[n]
    model.zero_grad(set_to_none=True)
    return total, torch.stack(norms)


def noise_free_private(model, num_examples: int, max_grad_norm: float = 1.0, **make_private_kwargs):
    """(module, optimizer, criterion) of make_private over SGD (lr 1) without noise, for one batch of all
    `num_examples` examples (no Poisson sampling)."""
    loader = DataLoader(TensorDataset(torch.arange(num_examples)), batch_size=num_examples)
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1.0)
    module, optimizer, criterion, _ = dp_utils.make_private(
        module=model,
        optimizer=optimizer,
        data_loader=loader,
        noise_multiplier=0.0,
        max_grad_norm=max_grad_norm,
        poisson_sampling=False,
        **make_private_kwargs,
    )
    return module, optimizer, criterion


def private_update(model, losses_fn, batch, max_grad_norm: float, mode: str, num_examples: int, **criterion_kwargs):
    """The gradient one make_private step applies (SGD, lr=1, noise 0, expected batch = num_examples).

    That is the parameter change; read from `.grad` because `before - after` rounds small updates in fp32.
    """
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    multiplicity = criterion_kwargs.pop("noise_multiplicity", 1)
    module, optimizer, criterion = noise_free_private(
        model, num_examples, max_grad_norm, grad_sample_mode=mode, noise_multiplicity=multiplicity
    )
    engine = optimizer.privacy_engine.clipping_engine
    if engine is not None:
        engine.record_norms = True
    losses_fn(module, *batch, criterion=lambda out, target: criterion(out, target, **criterion_kwargs)).backward()
    optimizer.step()
    norms = engine.per_example_norms if engine is not None else None
    if engine is not None:
        engine.detach()
    for n, p in model.named_parameters():
        applied = torch.zeros_like(p) if p.grad is None else p.grad
        torch.testing.assert_close(before[n] - p.detach(), applied, rtol=0, atol=1e-6 * before[n].abs().max().item())
    return {n: torch.zeros_like(p) if p.grad is None else p.grad for n, p in model.named_parameters()}, norms


def relative_error(update: dict, expected: dict) -> float:
    """Largest parameter error relative to the whole expected update (near-zero gradients stay meaningful)."""
    scale = torch.sqrt(sum(e.pow(2).sum() for e in expected.values()))
    return max(((update[n] - expected[n]).norm() / scale).item() for n in expected)
