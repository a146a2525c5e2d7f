"""Weight interpolation of a DP model with the public model it was fine-tuned from: alpha * DP + (1 - alpha) * public.

A function of the released DP pipeline and the public pipeline only: post-processing, no privacy cost, provided
alpha is fixed without looking at the private data.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from diffusers import DiTTransformer2DModel
from huggingface_hub import ModelCard


@torch.no_grad()
def interpolate_state(dp: dict, public: dict, alpha: float) -> dict:
    """alpha * dp + (1 - alpha) * public, tensor by tensor (same names and shapes, or ValueError)."""
    if dp.keys() != public.keys() or any(dp[k].shape != public[k].shape for k in dp):
        raise ValueError("The DP and public transformers differ in parameters or shapes: they cannot be interpolated.")
    return {k: torch.lerp(public[k].double(), dp[k].double(), alpha).to(dp[k].dtype) for k in dp}


def interpolate_pipeline(dp_dir: str | Path, public_dir: str | Path, alpha: float, output_dir: str | Path) -> Path:
    """Copy the DP pipeline folder to output_dir with its transformer interpolated toward the public one; the privacy
    report and the card name the post-processing."""
    if not 0 <= alpha <= 1:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    dp_dir, public_dir, output_dir = Path(dp_dir), Path(public_dir), Path(output_dir)
    dp = DiTTransformer2DModel.from_pretrained(dp_dir / "transformer")
    public = DiTTransformer2DModel.from_pretrained(public_dir / "transformer")
    dp.load_state_dict(interpolate_state(dp.state_dict(), public.state_dict(), alpha))
    shutil.copytree(dp_dir, output_dir, ignore=shutil.ignore_patterns("checkpoint-*", "logs", "transformer"))
    dp.save_pretrained(output_dir / "transformer")
    step = f"weights interpolated: {alpha:g} x the DP model + {1 - alpha:g} x the public model {public_dir}"
    report_path = output_dir / "privacy_report.json"
    report = json.loads(report_path.read_text())
    report["post_processing"] = [*report.get("post_processing", []), step]
    report_path.write_text(json.dumps(report, indent=2))
    card_path = output_dir / "README.md"
    if card_path.exists():
        card = ModelCard.load(card_path)
        card.text += f"\n\n## Post-processing\n\nNo privacy cost: {step}.\n"
        card.save(card_path)
    return output_dir
