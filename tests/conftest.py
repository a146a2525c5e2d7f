"""Shared fixtures: tiny DiT pipelines and AutoencoderKL, real photos and digits on disk, latent caches of them."""

import socket
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))  # the scripts live at the repo root, not in a package

# Files of the photo folder, in the order the cache lists them (class folders sorted, then file names).
PHOTO_FILES = [
    "cat/chelsea.jpg",
    "cat/coffee_cmyk.jpg",
    "cat/coffee_palette.png",
    "cat/truncated.jpg",
    "misc/astronaut_rgba.png",
    "misc/camera16.png",
    "misc/camera_gray.jpg",
    "misc/garbage.jpg",
    "misc/rocket.png",
]
CORRUPT_FILES = ["cat/truncated.jpg", "misc/garbage.jpg"]
NUM_DIGITS = 120
TINY = dict(num_attention_heads=2, attention_head_dim=8, num_layers=2, patch_size=2, num_embeds_ada_norm=1000)


@pytest.fixture
def cuda_graph_stand_ins(monkeypatch) -> list:
    """CUDA graphs' wiring on CPU: make_private(cuda_graphs=True) passes the device check, streams do nothing, and a
    capture records the function, which each replay runs (the capture itself takes no step, as a real one). The
    list holds the generator of each capture."""
    import contextlib
    import types

    from dp_utils.privacy import cuda_graphs, privacy_engine

    captured = []

    def capture(fn, generator=None):
        captured.append(generator)
        return types.SimpleNamespace(replay=fn)

    stream = types.SimpleNamespace(wait_stream=lambda other: None)
    monkeypatch.setattr(privacy_engine, "check_cuda_graphs", lambda *args: None)
    monkeypatch.setattr(cuda_graphs, "check_cuda_device", lambda *args: None)
    monkeypatch.setattr(cuda_graphs, "capture_graph", capture)
    monkeypatch.setattr(torch.cuda, "Stream", lambda: stream)
    monkeypatch.setattr(torch.cuda, "current_stream", lambda: stream)
    monkeypatch.setattr(torch.cuda, "stream", lambda s: contextlib.nullcontext())
    return captured


def free_port() -> int:
    """A TCP port nobody listens on now, for a launcher's rendezvous (`--main_process_port`)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture(scope="session")
def pixel_pipeline(tmp_path_factory) -> Path:
    """A DiT 'checkpoint' for 8x8 RGB pixels with ImageNet's 1000 classes, laid out like a Hub pipeline."""
    from diffusers import DDPMScheduler, DiTTransformer2DModel

    path = tmp_path_factory.mktemp("pixel_pipeline")
    torch.manual_seed(0)
    DiTTransformer2DModel(in_channels=3, out_channels=6, sample_size=8, **TINY).save_pretrained(path / "transformer")
    DDPMScheduler(num_train_timesteps=1000).save_pretrained(path / "scheduler")
    return path


@pytest.fixture(scope="session")
def tiny_vae_path(tmp_path_factory) -> Path:
    """A 2-level AutoencoderKL (downsampling factor 2, 4 latent channels) saved with `save_pretrained`."""
    import torch
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    vae = AutoencoderKL(
        block_out_channels=(8, 16),
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=8,
        sample_size=32,
    )
    path = tmp_path_factory.mktemp("tiny_vae")
    vae.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def photo_dir(tmp_path_factory) -> Path:
    """scikit-image's sample photos in two class folders, in assorted formats and modes, plus two corrupt files."""
    from skimage import data

    root = tmp_path_factory.mktemp("photos")
    (root / "cat").mkdir()
    (root / "misc").mkdir()
    Image.fromarray(data.chelsea()).save(root / "cat/chelsea.jpg", quality=90)
    coffee = Image.fromarray(data.coffee())
    coffee.convert("CMYK").save(root / "cat/coffee_cmyk.jpg")
    coffee.quantize(64).save(root / "cat/coffee_palette.png")
    jpeg = (root / "cat/chelsea.jpg").read_bytes()
    (root / "cat/truncated.jpg").write_bytes(jpeg[: len(jpeg) // 3])
    astronaut = data.astronaut()
    alpha = np.tile(np.linspace(0, 255, astronaut.shape[1]).astype(np.uint8), (astronaut.shape[0], 1))
    alpha[:, :64] = 0  # the left strip fully transparent
    Image.fromarray(np.dstack([astronaut, alpha]), mode="RGBA").save(root / "misc/astronaut_rgba.png")
    camera = data.camera()
    Image.fromarray(camera.astype(np.uint16) * 257).save(root / "misc/camera16.png")  # 16-bit greyscale, I;16
    Image.fromarray(camera).save(root / "misc/camera_gray.jpg")
    (root / "misc/garbage.jpg").write_bytes(b"this is not a JPEG at all" * 10)
    Image.fromarray(data.rocket()).save(root / "misc/rocket.png")
    return root


def run_precompute(argv: list[str]) -> None:
    """Run the script's own entry point in-process."""
    import precompute_latents

    precompute_latents.main(precompute_latents.parse_args([str(a) for a in argv]))


@pytest.fixture(scope="session")
def photo_cache_args(photo_dir, tiny_vae_path) -> list[str]:
    """Arguments (minus --output_dir) of the reference photo cache: tiny VAE, 32px, flips, 3 shards."""
    args = ["--train_data_dir", photo_dir, "--vae", tiny_vae_path, "--resolution", 32, "--random_flip"]
    return [str(a) for a in args + ["--shard_size", 3, "--batch_size", 2]]


@pytest.fixture(scope="session")
def photo_cache(tmp_path_factory, photo_cache_args) -> Path:
    """The photo folder encoded by one uninterrupted single-process run."""
    out = tmp_path_factory.mktemp("photo_cache") / "cache"
    run_precompute(photo_cache_args + ["--output_dir", str(out)])
    return out


@pytest.fixture(scope="session")
def digits_dataset_dir(tmp_path_factory) -> Path:
    """The first scikit-learn digits (8x8, values 0..16) as a `datasets` dataset of PNGs, saved with save_to_disk."""
    import datasets
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = [Image.fromarray(np.rint(x * 255 / 16).astype(np.uint8)) for x in digits.images[:NUM_DIGITS]]
    features = datasets.Features(
        {"image": datasets.Image(), "label": datasets.ClassLabel(names=[str(k) for k in range(10)])}
    )
    dataset = datasets.Dataset.from_dict(
        {"image": images, "label": digits.target[:NUM_DIGITS].tolist()}, features=features
    )
    path = tmp_path_factory.mktemp("digits") / "dataset"
    dataset.save_to_disk(str(path))
    return path


@pytest.fixture(scope="session")
def digits_cache(tmp_path_factory, digits_dataset_dir) -> Path:
    """The digits in pixel space (`--vae none`) at 8x8, with flips."""
    out = tmp_path_factory.mktemp("digits_cache") / "cache"
    run_precompute(
        [
            "--dataset_name",
            digits_dataset_dir,
            "--vae",
            "none",
            "--resolution",
            8,
            "--random_flip",
            "--output_dir",
            out,
        ]
    )
    return out
