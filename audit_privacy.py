"""Audit the DP step empirically: the epsilon a membership test on a canary proves, beside the accountant's.

    python audit_privacy.py                    # sigma = 1, one step at q = 1: the bound must stay below epsilon
    python audit_privacy.py --break noise      # noise 10x smaller than the accountant is told: a violation

A white-box adversary sees each privatised update of the real step (make_private's Poisson loader, the clipping
engine, physical batches, the DP optimizer's noise) on a tiny MLP and tests whether a canary row, whose clipped
gradient it knows, was in the batch (dp_utils/privacy/audit.py). Prints a table, writes audit.json and audit.png
(the two score distributions; needs matplotlib) to --output_dir. Exit code 1 when the bound exceeds the
accountant's epsilon.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from dataclasses import asdict
from pathlib import Path

from dp_utils.clipping.engine import MODES
from dp_utils.errors import UserError, run_script
from dp_utils.privacy.audit import BREAKS, AuditConfig, plot_scores, run_audit


def main(args: argparse.Namespace) -> int:
    fields = {name: value for name, value in vars(args).items() if name in AuditConfig.__dataclass_fields__}
    config = AuditConfig(**fields)
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    result, inside, outside = run_audit(config)
    rows = [
        ("trials per world (a quarter choose the threshold)", f"{config.trials}"),
        ("noise multiplier told to the accountant", f"{config.noise_multiplier:g}"),
        ("broken setting", config.break_),
        ("sample rate q", f"{1 / math.ceil(config.rows / config.logical_batch_size):.4g}"),
        ("canary's clipped norm / C", f"{result.canary_norm:.4f}"),
        ("steps accounted (one per logical batch)", f"{result.accounted_steps}"),
        (f"threshold (the test: {result.direction})", f"{result.threshold:.3f}"),
        ("TPR on held-out trials (lower bound)", f"{result.tpr:.4f} ({result.tpr_lower:.4f})"),
        ("FPR on held-out trials (upper bound)", f"{result.fpr:.4f} ({result.fpr_upper:.4f})"),
        (
            f"epsilon lower bound ({config.confidence:.0%}, delta {config.delta:g})",
            f"{result.epsilon_lower_bound:.3f}",
        ),
        (f"accountant's epsilon ({config.accountant}, one step)", f"{result.accountant_epsilon:.3f}"),
    ]
    width = max(len(name) for name, _ in rows)
    print("\n".join(f"{name:<{width}}  {value}" for name, value in rows))
    report = {**result.to_json(), "config": asdict(config)}
    (out / "audit.json").write_text(json.dumps(report, indent=2))
    plotted = plot_scores(result, inside, outside, out / "audit.png")
    print(
        f"Wrote {out / 'audit.json'}" + (f" and {out / 'audit.png'}" if plotted else " (no PNG: matplotlib missing)")
    )
    if result.violation:
        print(
            f"VIOLATION: the audit proves epsilon >= {result.epsilon_lower_bound:.3f}, above the accountant's "
            f"{result.accountant_epsilon:.3f}: the step leaks more than it accounts."
        )
        return 1
    print("No violation: the proved lower bound is below the accountant's epsilon.")
    return 0


def parse_args(input_args=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    defaults = AuditConfig()
    add = parser.add_argument
    add(
        "--trials",
        type=int,
        default=defaults.trials,
        help="Trials per world (canary in, canary out). Default: %(default)s.",
    )
    add("--noise_multiplier", type=float, default=defaults.noise_multiplier, help="Sigma. Default: %(default)s.")
    add("--max_grad_norm", type=float, default=defaults.max_grad_norm, help="Clipping norm C. Default: %(default)s.")
    add("--rows", type=int, default=defaults.rows, help="Dataset rows, the canary included. Default: %(default)s.")
    add(
        "--logical_batch_size",
        type=int,
        default=defaults.logical_batch_size,
        help="Expected Poisson batch; q = 1 / ceil(rows / this). Default: %(default)s (q = 1, the tightest audit).",
    )
    add(
        "--max_physical_batch_size",
        type=int,
        default=defaults.max_physical_batch_size,
        help="Rows per backward; the noise is added once per logical batch. Default: %(default)s.",
    )
    add("--grad_sample_mode", choices=MODES, default=defaults.grad_sample_mode, help="Default: %(default)s.")
    add("--accountant", choices=["prv", "rdp"], default=defaults.accountant, help="Default: %(default)s.")
    add("--delta", type=float, default=defaults.delta, help="Delta of both epsilons. Default: %(default)s.")
    add(
        "--confidence",
        type=float,
        default=defaults.confidence,
        help="Of each Clopper-Pearson bound. Default: %(default)s.",
    )
    add(
        "--break",
        dest="break_",
        choices=BREAKS,
        default=defaults.break_,
        help="Audit a deliberately broken step: noise (noise std 10x smaller than the accountant is told), clip "
        "(examples clipped at 10 C). Default: %(default)s.",
    )
    add("--seed", type=int, default=defaults.seed, help="Seed of the model and rows. Default: %(default)s.")
    add(
        "--noise_seed",
        type=int,
        help="Seed of the noise and batches, for a reproducible audit. Default: secret, from the operating system.",
    )
    add("--output_dir", default="audit", help="Where audit.json and audit.png go. Default: %(default)s.")
    args = parser.parse_args(input_args)
    if args.trials < 4:
        raise UserError(f"--trials must be at least 4 (a quarter choose the threshold), got {args.trials}.")
    if not 0 < args.confidence < 1:
        raise UserError(f"--confidence must be in (0, 1), got {args.confidence}.")
    if args.noise_multiplier <= 0:
        raise UserError(
            f"--noise_multiplier must be > 0 (no noise, no epsilon to audit), got {args.noise_multiplier}."
        )
    for flag in ("rows", "logical_batch_size", "max_physical_batch_size"):
        if getattr(args, flag) < 1:
            raise UserError(f"--{flag} must be >= 1, got {getattr(args, flag)}.")
    return args


if __name__ == "__main__":
    sys.exit(run_script(lambda: main(parse_args())))
