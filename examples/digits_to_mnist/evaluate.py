"""Score class-conditional digit models with tools no training run has seen, and draw their samples.

    python examples/digits_to_mnist/evaluate.py --data_dir mnist-quickstart/data mnist-quickstart/dp-eps10

A small classifier (MLP), the judge, is trained on the 4000 private MNIST digits (it never sees the 1000 held-out
ones) and tested on the held-out 1000. Each model then samples --samples_per_class digits of every class, scored by:

- recognised: the fraction of samples the judge labels as the class they were conditioned on (chance: 10%);
- CAS (classification accuracy score): the same classifier trained on the samples alone, tested on the held-out digits;
- FD: the Frechet distance between samples and held-out digits in the judge's penultimate features (lower is better).

It prints a Markdown table, writes it to <results_dir>/results.md and draws a grid per model (one row per class).
"""

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from dp_utils.training.generation import sample_pixel_pipeline  # noqa: E402


class DigitClassifier(nn.Module):
    """An MLP on the 256 pixels with a 128-unit feature layer (a CNN scores 1-2 points higher, 10x slower on CPU)."""

    def __init__(self, pixels: int = 256):
        super().__init__()
        self.features = nn.Sequential(nn.Flatten(), nn.Linear(pixels, 256), nn.ReLU(), nn.Linear(256, 128), nn.ReLU())
        self.head = nn.Linear(128, 10)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(images))


def load_folder(folder: Path) -> tuple[torch.Tensor, torch.Tensor]:
    """Images (N, 1, H, W) in [0, 1] and labels (N,) of a folder written by prepare_data.py."""
    paths = sorted(folder.glob("*/*.png"))
    images = np.stack([np.asarray(Image.open(p).convert("L"), dtype=np.float32) / 255 for p in paths])
    labels = [int(p.parent.name) for p in paths]
    return torch.from_numpy(images)[:, None], torch.tensor(labels)


def train_classifier(images: torch.Tensor, labels: torch.Tensor, seed: int, epochs: int = 20) -> DigitClassifier:
    torch.manual_seed(seed)
    model = DigitClassifier()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    for _ in range(epochs):
        for batch in torch.randperm(len(images)).split(128):
            loss = nn.functional.cross_entropy(model(images[batch]), labels[batch])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    return model.eval()


@torch.no_grad()
def predict(model: DigitClassifier, images: torch.Tensor) -> tuple[torch.Tensor, np.ndarray]:
    """Predicted classes and penultimate features (float64)."""
    features = model.features(images)
    return model.head(features).argmax(1), features.double().numpy()


def frechet_distance(a: np.ndarray, b: np.ndarray) -> float:
    """Frechet distance between Gaussians fitted to two feature sets (FID's formula).

    tr sqrt(A B) as the eigenvalues of sqrt(A) B sqrt(A), symmetric: stable for the singular covariances of ReLU
    features (scipy's sqrtm of A B is not).
    """
    cov_a, cov_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    values, vectors = np.linalg.eigh(cov_a)
    sqrt_a = (vectors * np.sqrt(values.clip(0))) @ vectors.T
    trace_sqrt = np.sqrt(np.linalg.eigvalsh(sqrt_a @ cov_b @ sqrt_a).clip(0)).sum()
    mean_term = ((a.mean(0) - b.mean(0)) ** 2).sum()
    return float(mean_term + np.trace(cov_a) + np.trace(cov_b) - 2 * trace_sqrt)


def scored_variants(args) -> list[tuple[Path, str | None, int]]:
    """(model, finisher pipeline, finisher steps) to score: each --finisher_steps K with --public_model, or by default
    the finisher a model's privacy report recommends (train_dp_dit.py --public_finisher_steps), else none."""
    public = Path(args.public_model).resolve()
    variants = []
    for model_dir in map(Path, args.model_dirs):
        if args.finisher_steps is None:
            report = json.loads((model_dir / "privacy_report.json").read_text())
            finisher = (report.get("recipe") or {}).get("public_finisher")
            variants.append(
                (model_dir, finisher["model"], finisher["last_steps"]) if finisher else (model_dir, None, 0)
            )
        else:
            is_public = model_dir.resolve() == public
            variants += [(model_dir, args.public_model, k) for k in args.finisher_steps if not (k and is_public)]
    return variants


def sample(model_dir: Path, per_class: int, args, finisher_dir: str | None = None, finisher_steps: int = 0):
    """Grey samples (10 * per_class, 1, H, W), class c at rows c * per_class ..., from a pixel-space model folder;
    the last `finisher_steps` sampling steps by the transformer of the pipeline in `finisher_dir`."""
    labels = [digit for digit in range(10) for _ in range(per_class)]
    images = sample_pixel_pipeline(
        model_dir,
        labels,
        args.guidance_scale,
        args.num_inference_steps,
        args.seed,
        finisher_dir=finisher_dir,
        finisher_steps=finisher_steps,
    )
    return images.mean(1, keepdim=True)


def bootstrap_se(statistic, *arrays: np.ndarray, rounds: int = 100, seed: int = 0) -> float:
    """Standard error of statistic(*arrays) by resampling the rows of the first array (the samples)."""
    rng = np.random.default_rng(seed)
    n = len(arrays[0])
    values = [statistic(arrays[0][rng.integers(0, n, n)], *arrays[1:]) for _ in range(rounds)]
    return float(np.std(values, ddof=1))


def save_labelled_grid(images: torch.Tensor, per_class: int, path: Path, columns: int = 10, scale: int = 3) -> None:
    """One row per class (its first `columns` samples), upscaled, with gaps and the class on the left."""
    size, gap, margin = images.shape[-1] * scale, 4, 20
    grid = Image.new("L", (margin + columns * (size + gap), 10 * (size + gap)), 255)
    draw = ImageDraw.Draw(grid)
    for digit in range(10):
        top = digit * (size + gap)
        draw.text((5, top + size // 2 - 6), str(digit), fill=0)
        for column in range(columns):
            image = images[digit * per_class + column, 0].numpy()
            tile = Image.fromarray(np.rint(image * 255).astype(np.uint8)).resize((size, size), Image.NEAREST)
            grid.paste(tile, (margin + column * (size + gap), top))
    path.parent.mkdir(parents=True, exist_ok=True)
    grid.save(path)


def describe(model_dir: Path) -> str:
    """Training images, epsilon and steps from the run's privacy report, as table cells."""
    report = json.loads((model_dir / "privacy_report.json").read_text())
    epsilon = "inf (no noise)" if report["epsilon"] is None else f"{report['epsilon']:.2f}"
    return f"{report['dataset_size']} | {epsilon} | {report['steps']}"


def main(args):
    torch.set_num_threads(args.num_threads)
    data = Path(args.data_dir)
    train_images, train_labels = load_folder(data / "private")
    test_images, test_labels = load_folder(data / "heldout")
    judge = train_classifier(train_images, train_labels, args.seed)
    test_predictions, test_features = predict(judge, test_images)
    judge_accuracy = (test_predictions == test_labels).float().mean().item()
    public_images, public_labels = load_folder(data / "public")
    public_accuracy = (predict(judge, public_images)[0] == public_labels).float().mean().item()
    lines = [
        f"Judge (an MLP trained on the 4000 private MNIST digits): {judge_accuracy:.1%} on the 1000 held-out ones, "
        f"{public_accuracy:.1%} on the 1797 public scikit-learn digits.",
        "",
        "| model | trained on (images) | epsilon | steps | recognised as their class | CAS | FD |",
        "|---|---|---|---|---|---|---|",
    ]
    print("\n".join(lines), flush=True)
    results = Path(args.results_dir)
    save_labelled_grid(test_images, 100, results / "grids" / "heldout-mnist.png")
    per_class = args.samples_per_class
    labels = torch.arange(10).repeat_interleave(per_class)
    for model_dir, finisher_dir, finisher_steps in scored_variants(args):
        images = sample(model_dir, per_class, args, finisher_dir, finisher_steps)
        predictions, features = predict(judge, images)
        hits = (predictions == labels).float().numpy()
        recognised, recognised_se = hits.mean(), hits.std() / np.sqrt(len(hits))
        cas_model = train_classifier(images, labels, args.seed)
        cas = (predict(cas_model, test_images)[0] == test_labels).float().mean().item()
        cas_se = np.sqrt(cas * (1 - cas) / len(test_labels))  # over the test digits; retraining adds to it
        distance = frechet_distance(features, test_features)
        distance_se = bootstrap_se(frechet_distance, features, test_features)
        name = model_dir.name + (
            f", last {finisher_steps} of {args.num_inference_steps} steps by the public model"
            if finisher_steps
            else ""
        )
        lines.append(
            f"| {name} | {describe(model_dir)} | {recognised:.1%} ± {recognised_se:.1%} | {cas:.1%} ± {cas_se:.1%} "
            f"| {distance:.1f} ± {distance_se:.1f} |"
        )
        print(lines[-1], flush=True)
        suffix = f"-finisher{finisher_steps}" if finisher_steps else ""
        save_labelled_grid(images, per_class, results / "grids" / f"{model_dir.name}{suffix}.png")
    (results / "results.md").write_text("\n".join(lines) + "\n")
    print(f"Wrote {results / 'results.md'} and sample grids in {results / 'grids'}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model_dirs", nargs="+", help="Pixel-space model folders written by train_dp_dit.py.")
    parser.add_argument("--data_dir", required=True, help="The folder prepare_data.py wrote.")
    parser.add_argument("--results_dir", default="quickstart", help="Where results.md and grids/ go.")
    parser.add_argument("--samples_per_class", type=int, default=100, help="Samples generated per digit.")
    parser.add_argument("--guidance_scale", type=float, default=4.0, help="Classifier-free guidance scale.")
    parser.add_argument("--num_inference_steps", type=int, default=25, help="DPM-Solver steps.")
    parser.add_argument(
        "--public_model",
        default="examples/digits_to_mnist/public-model",
        help="The public pipeline that takes the last --finisher_steps sampling steps.",
    )
    parser.add_argument(
        "--finisher_steps",
        type=int,
        nargs="+",
        help="Score each model with its last K sampling steps by --public_model, for each K given (0: none; "
        "default: the finisher each model's privacy report recommends, if any).",
    )
    parser.add_argument("--seed", type=int, default=0, help="Seed of the classifiers and the sampling noise.")
    parser.add_argument("--num_threads", type=int, default=2, help="torch CPU threads.")
    main(parser.parse_args())
