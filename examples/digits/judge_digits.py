"""Judge generated digits: a classifier trained on the real digits says how often a sample is the class it was
conditioned on (chance: 10%).

    python examples/digits/judge_digits.py quickstart/dp-eps10 quickstart/non-private
"""

import argparse
import json
import sys
from pathlib import Path

import numpy as np
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from sklearn.svm import SVC

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from dp_utils.training.generation import sample_pixel_pipeline  # noqa: E402


def judge(model_dir: Path, classifier, samples_per_class: int, guidance_scale: float, seed: int) -> float:
    """Fraction of samples the classifier assigns to the class they were generated for."""
    labels = [digit for digit in range(10) for _ in range(samples_per_class)]
    images = sample_pixel_pipeline(model_dir, labels, guidance_scale, seed=seed)
    features = (images.mean(1) * 16).flatten(1).numpy()  # grey levels 0..16, as the real digits
    return float((classifier.predict(features) == np.array(labels)).mean())


def main(args):
    digits = load_digits()
    x_train, x_test, y_train, y_test = train_test_split(digits.data, digits.target, test_size=0.3, random_state=0)
    classifier = SVC(gamma=0.001).fit(x_train, y_train)
    print(f"classifier accuracy on held-out real digits: {classifier.score(x_test, y_test):.3f}")
    classifier.fit(digits.data, digits.target)
    print("| model | epsilon | samples recognised as their class |")
    print("|---|---|---|")
    for model_dir in map(Path, args.model_dirs):
        report = json.loads((model_dir / "privacy_report.json").read_text())
        accuracy = judge(model_dir, classifier, args.samples_per_class, args.guidance_scale, args.seed)
        epsilon = "inf (non-private)" if report["epsilon"] is None else f"{report['epsilon']:.2f}"
        print(f"| {model_dir} | {epsilon} | {accuracy:.3f} |")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model_dirs", nargs="+", help="Output folders of train_dp_dit.py trained on the digits.")
    parser.add_argument("--samples_per_class", type=int, default=50, help="Samples generated per digit.")
    parser.add_argument("--guidance_scale", type=float, default=4.0, help="Classifier-free guidance scale.")
    parser.add_argument("--seed", type=int, default=0, help="Seed of the sampling noise.")
    main(parser.parse_args())
