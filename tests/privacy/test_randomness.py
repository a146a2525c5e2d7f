"""Secret randomness: full-state generators, OS-entropy defaults, reproducible only on request, exact resume."""

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import dp_utils
from dp_utils.privacy.randomness import DPRandomness, generator_from_entropy, secret_seed


def test_entropy_beyond_32_bits_changes_the_stream():
    # torch's own manual_seed keeps only the low 32 bits: the weakness generator_from_entropy avoids
    same = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5 + 2**32)
    assert torch.equal(torch.randn(4, generator=same[0]), torch.randn(4, generator=same[1]))
    ours = generator_from_entropy(5), generator_from_entropy(5 + 2**32)
    assert not torch.equal(torch.randn(4, generator=ours[0]), torch.randn(4, generator=ours[1]))
    far = generator_from_entropy(2**127 + 1), generator_from_entropy(2**127 + 1)
    assert torch.equal(torch.randn(4, generator=far[0]), torch.randn(4, generator=far[1]))


def test_full_state_generator_draws_uniform_and_normal_values():
    generator = generator_from_entropy(secret_seed())
    x = torch.randn(200_000, generator=generator, dtype=torch.float64)
    assert abs(x.mean().item()) < 4 / 200_000**0.5 and abs(x.std().item() - 1) < 4 / (2 * 200_000) ** 0.5
    u = torch.rand(200_000, generator=generator, dtype=torch.float64)
    assert abs(u.mean().item() - 0.5) < 4 * (1 / 12 / 200_000) ** 0.5


def test_secret_by_default_reproducible_on_request_and_restored_from_its_state():
    first, second = DPRandomness(None), DPRandomness(None)
    assert not first.reproducible and first.sampling_seed != second.sampling_seed
    assert not torch.equal(
        torch.randn(8, generator=first.noise_generator), torch.randn(8, generator=second.noise_generator)
    )
    seeded, again = DPRandomness(7), DPRandomness(7)
    assert seeded.reproducible and seeded.sampling_seed == again.sampling_seed
    assert seeded.sampling_seed.bit_length() > 64  # a 128-bit seed, not guessable from --noise_seed's range alone
    torch.randn(3, generator=seeded.noise_generator)  # advance, then checkpoint
    state = seeded.state_dict()
    resumed = DPRandomness(None)
    resumed.load_state_dict(state)
    assert resumed.sampling_seed == seeded.sampling_seed
    assert torch.equal(
        torch.randn(8, generator=resumed.noise_generator), torch.randn(8, generator=seeded.noise_generator)
    )


def _one_noisy_step(**kwargs) -> torch.Tensor:
    """The update of one step of make_private with a zero gradient (pure noise), torch's RNG seeded alike."""
    torch.manual_seed(0)
    model = nn.Linear(20, 10).double()
    data = TensorDataset(torch.randn(8, 20, dtype=torch.float64), torch.randn(8, 10, dtype=torch.float64))
    module, optimizer, criterion, loader = dp_utils.make_private(
        module=model,
        optimizer=torch.optim.SGD(model.parameters(), lr=1.0),
        data_loader=DataLoader(data, batch_size=4),
        noise_multiplier=1.0,
        max_grad_norm=1.0,
        **kwargs,
    )
    before = torch.cat([p.detach().flatten().clone() for p in model.parameters()])
    x, y = data.tensors
    criterion(module(x) * 0, y * 0).backward()
    optimizer.step()
    return before - torch.cat([p.detach().flatten() for p in model.parameters()])


def test_make_private_noise_and_batches_ignore_torch_manual_seed():
    assert not torch.equal(_one_noisy_step(), _one_noisy_step())  # the same torch seed, different noise
    seeded = [_one_noisy_step(noise_generator=generator_from_entropy(3)) for _ in range(2)]
    assert torch.equal(*seeded)  # a generator passed in is used as is

    def batches():
        torch.manual_seed(0)
        model = nn.Linear(2, 1)
        data = TensorDataset(torch.arange(200.0)[:, None], torch.zeros(200, 1))
        _, _, _, loader = dp_utils.make_private(
            module=model,
            optimizer=torch.optim.SGD(model.parameters(), lr=1.0),
            data_loader=DataLoader(data, batch_size=20),
            noise_multiplier=1.0,
            max_grad_norm=1.0,
        )
        return [x.flatten().tolist() for x, _ in loader]

    assert batches() != batches()
