"""--push_to_hub: the finished model goes to the Hub; what was derived from the private data without noise stays.

Never uploaded: checkpoints (they hold every rank's RNG state, which replays the run's draws, and the raw
optimizer state) and the tracker logs under the output folder (the loss curve is computed on the private images
without noise). The model, its card, the privacy report and the sample grids (drawn from the DP model) go up.
"""

from __future__ import annotations

import os
from pathlib import Path

from huggingface_hub import create_repo, upload_folder
from huggingface_hub.utils import filter_repo_objects

from .checkpoints import TEMPORARY_PREFIX


def ignore_patterns(output_dir: str | os.PathLike, logging_dir: str | os.PathLike) -> list[str]:
    """Patterns (relative to the output folder) that upload_folder skips."""
    patterns = ["checkpoint-*", f"{TEMPORARY_PREFIX}*"]
    logs = Path(output_dir, logging_dir).resolve()
    if logs.is_relative_to(Path(output_dir).resolve()):
        patterns.append(f"{logs.relative_to(Path(output_dir).resolve()).as_posix()}/*")
    return patterns


def files_to_upload(output_dir: str | os.PathLike, logging_dir: str | os.PathLike) -> list[str]:
    """The files `push_to_hub` uploads, as upload_folder selects them."""
    out = Path(output_dir)
    files = sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file())
    return list(filter_repo_objects(files, ignore_patterns=ignore_patterns(output_dir, logging_dir)))


def create_model_repo(output_dir: str | os.PathLike, hub_model_id: str | None, token: str | None) -> str:
    """Create (or reuse) the Hub repository before training, so that a missing login fails first; its id."""
    return create_repo(hub_model_id or Path(output_dir).name, exist_ok=True, token=token).repo_id


def push_to_hub(output_dir: str | os.PathLike, repo_id: str, logging_dir: str | os.PathLike, token: str | None):
    """Upload the finished output folder, without checkpoints or logs."""
    return upload_folder(
        repo_id=repo_id,
        folder_path=output_dir,
        commit_message="End of training",
        ignore_patterns=ignore_patterns(output_dir, logging_dir),
        token=token,
    )
