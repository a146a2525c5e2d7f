"""The randomness the guarantee relies on: DP noise and Poisson sampling, from sources nobody can replay.

An adversary who can regenerate the noise subtracts it, and one who can regenerate the batches loses the
amplification by subsampling; so both come from a 128-bit secret drawn from the operating system (`os.urandom`),
not from `--seed`, which stays for the non-private draws (initialisation, timesteps, latent draws).

torch's CPU generator keeps only the low 32 bits of `manual_seed(seed)` (2^32 streams: a brute-force search away),
so a CPU generator here gets its whole Mersenne Twister state (624 words) expanded from the secret by numpy's
SeedSequence; a CUDA generator (Philox) takes a 64-bit key. Neither is a cryptographic generator: the secret is
their seed, and the generator state in a checkpoint is as secret as the private data.
"""

from __future__ import annotations

import secrets

import numpy as np
import torch

SECRET_BITS = 128
REPRODUCIBLE_NOISE_WARNING = (
    "--noise_seed makes the DP noise and the Poisson batches reproducible: the (epsilon, delta) guarantee holds only "
    "while this seed stays as secret as the training images (it is written nowhere; the report and card say so)."
)
MT_WORDS = 624  # MT19937's state
_MT_STATE_SLICE = slice(24, 24 + 8 * MT_WORDS)  # CPU state: seed u64, left i32, seeded i32, next u64, 624 x u64


def secret_seed() -> int:
    """128 bits from the operating system's entropy (`os.urandom`)."""
    return secrets.randbits(SECRET_BITS)


def generator_from_entropy(entropy: int | list[int], device: torch.device | str = "cpu") -> torch.Generator:
    """A generator on `device` whose whole state is expanded from `entropy` (ints of any size, via SeedSequence)."""
    device = torch.device(device)
    sequence = np.random.SeedSequence(entropy)
    generator = torch.Generator(device=device)
    if device.type != "cpu":  # Philox: a 64-bit key is its whole seed
        return generator.manual_seed(int(sequence.generate_state(1, np.uint64)[0]))
    state = generator.get_state()
    words = sequence.generate_state(MT_WORDS, np.uint32).astype(np.uint64)
    words[0] = 1 << 31  # as numpy's MT19937: only this word's top bit is used, and set it keeps the state non-zero
    state[_MT_STATE_SLICE] = torch.from_numpy(words.view(np.uint8))  # a fresh generator's `left` is 1: next draw mixes
    generator.set_state(state)
    if not torch.equal(generator.get_state()[_MT_STATE_SLICE], state[_MT_STATE_SLICE]):  # a changed state layout
        raise RuntimeError("This torch's CPU generator state has an unknown layout; cannot seed it in full.")
    return generator


def fork_entropy(generator: torch.Generator | None, count: int) -> list[list[int]]:
    """`count` fresh 248-bit entropies drawn from `generator` (None: torch's global one), for child generators."""
    return torch.randint(2**62, (count, 4), generator=generator).tolist()


def shared_secret_seed() -> int:
    """A secret seed drawn on rank 0 and sent to every rank (the same Poisson batches everywhere)."""
    seed = [secret_seed()]
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.broadcast_object_list(seed, src=0)
    return seed[0]


class DPRandomness:
    """The noise generator and the Poisson sampling seed of a run; checkpointed (secret), never published.

    `noise_seed=None` (the default) draws both from the operating system's entropy; an integer makes them
    reproducible, and the guarantee then holds only while that integer stays secret.
    """

    def __init__(self, noise_seed: int | None, device: torch.device | str = "cpu"):
        self.reproducible = noise_seed is not None
        master = shared_secret_seed() if noise_seed is None else int(noise_seed)
        self.noise_generator = generator_from_entropy([master, 0], device)
        self.sampling_seed = int.from_bytes(np.random.SeedSequence([master, 1]).generate_state(4).tobytes(), "little")

    def state_dict(self) -> dict:
        return {"noise_generator": self.noise_generator.get_state(), "sampling_seed": self.sampling_seed}

    def load_state_dict(self, state: dict) -> None:
        self.noise_generator.set_state(state["noise_generator"])
        self.sampling_seed = state["sampling_seed"]
