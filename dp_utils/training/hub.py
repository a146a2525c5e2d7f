"""--push_to_hub: the finished model goes to the Hub; what was derived from the private data without noise stays.

Never uploaded: checkpoints (they hold every rank's RNG state, which replays the run's draws, and the raw
optimizer state) and the tracker logs under the output folder (the loss curve is computed on the private images
without noise). The model, its card, the privacy report and the sample grids (drawn from the DP model) go up. What
goes is chosen here, by linking it into a staging folder that is uploaded whole: the selection does not depend on
how a version of huggingface_hub reads ignore patterns, and a test can read the staged folder.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

from huggingface_hub import constants, create_repo, get_token, upload_folder

from ..errors import UserError, one_line
from .checkpoints import CHECKPOINT_NAME, TEMPORARY_PREFIX


def create_model_repo(output_dir: str | os.PathLike, hub_model_id: str | None, token: str | None) -> str:
    """Create (or reuse) the Hub repository before anything is loaded, so that a missing login or network fails
    first, as a UserError; its id."""
    name = hub_model_id or Path(output_dir).name
    if constants.HF_HUB_OFFLINE:
        raise UserError("--push_to_hub needs the network, but HF_HUB_OFFLINE is set: unset it or drop --push_to_hub.")
    if not (token or get_token()):
        raise UserError(
            "--push_to_hub needs a Hub token: run `hf auth login` (or set HF_TOKEN) first, or drop --push_to_hub."
        )
    try:
        return create_repo(name, exist_ok=True, token=token).repo_id
    except Exception as error:  # no network, a refused token, a bad name: huggingface_hub raises many kinds
        raise UserError(
            f"--push_to_hub: could not create or reach the Hub repository {name} ({one_line(error)}). Check the "
            "network, your token (`hf auth whoami`) and --hub_model_id, or drop --push_to_hub."
        ) from None


def stage_upload(output_dir: str | os.PathLike, logging_dir: str | os.PathLike, staging: str | os.PathLike) -> Path:
    """Link (or copy) into `staging` what is published of `output_dir`: not its checkpoints, nor its tracker logs."""
    out, staging = Path(output_dir).resolve(), Path(staging)
    logs = Path(out, logging_dir).resolve()
    for path in sorted(out.rglob("*")):
        relative = path.relative_to(out)
        top = relative.parts[0]
        private = CHECKPOINT_NAME.fullmatch(top) or top.startswith(TEMPORARY_PREFIX) or path.is_relative_to(logs)
        if private or not path.is_file() or path.is_relative_to(staging.resolve()):
            continue
        target = staging / relative
        target.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.link(path, target)  # no copy of the weights on the same disk
        except OSError:
            shutil.copy2(path, target)
    return staging


def push_to_hub(output_dir: str | os.PathLike, repo_id: str, logging_dir: str | os.PathLike, token: str | None):
    """Upload the finished output folder, without checkpoints or logs."""
    with tempfile.TemporaryDirectory(prefix=".upload-", dir=output_dir) as staging:
        return upload_folder(
            repo_id=repo_id,
            folder_path=stage_upload(output_dir, logging_dir, staging),
            commit_message="End of training",
            token=token,
        )
