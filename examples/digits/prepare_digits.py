"""Write scikit-learn's digits (1797 images, 8x8, ten classes) as an image folder: <output_dir>/<digit>/<i>.png."""

import argparse
from pathlib import Path

import numpy as np
from PIL import Image
from sklearn.datasets import load_digits


def main(args):
    digits = load_digits()
    for i, (image, label) in enumerate(zip(digits.images, digits.target, strict=True)):
        folder = Path(args.output_dir) / str(label)
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.rint(image * 255 / 16).astype(np.uint8)).save(folder / f"{i:04d}.png")
    print(f"Wrote {len(digits.images)} digits to {args.output_dir}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--output_dir", required=True, help="Folder to write the class sub-folders into.")
    main(parser.parse_args())
