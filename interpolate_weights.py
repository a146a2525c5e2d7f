"""Interpolate a DP pipeline's transformer with the public one it was fine-tuned from (post-processing, no privacy).

    python interpolate_weights.py mnist-quickstart/dp-eps10 examples/digits_to_mnist/public-model --alpha 0.5 \\
        --output_dir mnist-quickstart/dp-eps10-mix

Writes alpha * DP + (1 - alpha) * public into a copy of the DP pipeline folder; its privacy_report.json
(`post_processing`) and model card say so. Fix alpha without looking at the private data.
"""

import argparse
import shutil
import sys
from pathlib import Path

from dp_utils.errors import UserError, run_script
from dp_utils.training.interpolation import interpolate_pipeline


def main(args):
    if not 0 <= args.alpha <= 1:
        raise UserError(f"--alpha must be in [0, 1], got {args.alpha}.")
    for folder in (args.dp_model, args.public_model):
        if not Path(folder, "transformer", "config.json").is_file():
            raise UserError(f"{folder} is not a pipeline folder with a transformer/ (a train_dp_dit.py output).")
    output = Path(args.output_dir)
    if output.resolve() in (Path(args.dp_model).resolve(), Path(args.public_model).resolve()):
        raise UserError(f"--output_dir {output} is one of the input pipelines: pick a new folder.")
    if output.exists() and not args.overwrite_output_dir:
        raise UserError(f"--output_dir {output} exists: pick a new folder, or pass --overwrite_output_dir.")
    if output.exists():
        shutil.rmtree(output)
    interpolate_pipeline(args.dp_model, args.public_model, args.alpha, output)
    print(f"Wrote {output}")


def parse_args(input_args=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("dp_model", help="The DP pipeline folder train_dp_dit.py wrote.")
    parser.add_argument("public_model", help="The public pipeline folder it was fine-tuned from.")
    parser.add_argument("--alpha", type=float, default=0.5, help="Weight of the DP model (default: %(default)s).")
    parser.add_argument("--output_dir", required=True, help="A new folder for the interpolated pipeline.")
    parser.add_argument("--overwrite_output_dir", action="store_true", help="Replace an existing --output_dir.")
    return parser.parse_args(input_args)


if __name__ == "__main__":
    sys.exit(run_script(lambda: main(parse_args())))
