"""User errors: a bad flag, file or argument the user can fix, reported as one short message, not a traceback."""

from __future__ import annotations

import argparse
import errno
import json
import os
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import NoReturn


class UserError(ValueError):
    """Something the user can fix; the message names the problem and the fix. Scripts exit with code 2."""


def one_line(error: BaseException) -> str:
    """An exception as one short line, for a message that says what could not be read."""
    reason = " ".join(str(error).split()) or type(error).__name__
    return f"{type(error).__name__}: {reason}"[:300]


class ArgumentParser(argparse.ArgumentParser):
    """argparse whose errors are UserErrors: one `error:` line and exit code 2 through `run_script`, no usage dump."""

    def error(self, message: str) -> NoReturn:
        raise UserError(f"{message} (see --help)")


def check_writable_dir(flag: str, path: str | os.PathLike) -> None:
    """Refuse a folder that cannot be created or written, by trying: an unnamed file is made and dropped in the
    folder, or in its deepest existing parent if it does not exist yet (root passes any `os.access` test, so ask the
    disk). Nothing is created or left behind, so processes checking the same folder at once do not race."""
    target = Path(path).expanduser().absolute()
    try:
        existing = next(folder for folder in [target, *target.parents] if folder.exists())
        if not existing.is_dir():
            raise UserError(f"{flag} {path}: {existing} is a file, not a folder; give another path.")
        limit = os.pathconf(existing, "PC_NAME_MAX")
        if any(len(os.fsencode(name)) > limit for name in target.relative_to(existing).parts):
            raise OSError(errno.ENAMETOOLONG, os.strerror(errno.ENAMETOOLONG))
        with tempfile.TemporaryFile(dir=existing):
            pass
    except OSError as error:
        raise UserError(
            f"{flag} {path} cannot be created or written ({error.strerror or error}); give a folder you can write."
        ) from None


def check_num_workers(num_workers: int) -> None:
    """DataLoader workers: each is a process, so a count far beyond the CPUs would exhaust the machine."""
    most = 4 * (os.cpu_count() or 1)
    if not 0 <= num_workers <= most:
        raise UserError(
            f"--dataloader_num_workers must be in 0..{most} (4 per CPU here; each worker is a process), got "
            f"{num_workers}."
        )


def run_script(main: Callable[[], object]) -> int:
    """Run a script's `main`; a UserError becomes `error: <message>` on stderr and exit code 2, no traceback.

    Anything else is a bug or a fault and keeps its traceback. An int that `main` returns is the exit code.
    """
    try:
        code = main()
    except UserError as error:
        sys.stderr.write(f"error: {error}\n")  # one write: lines of two processes sharing stderr do not interleave
        sys.stderr.flush()
        _tell_elastic_launcher(f"error: {error}")
        return 2
    return code if isinstance(code, int) else 0


def _tell_elastic_launcher(message: str) -> None:
    """Under torchrun (`accelerate launch --multi_gpu`), put the message in the launcher's closing failure summary.

    torchelastic gives each worker an error file (TORCHELASTIC_ERROR_FILE); a JSON `message` string there is what
    its summary shows as the failed rank's "traceback", instead of a link to its docs.
    """
    path = os.environ.get("TORCHELASTIC_ERROR_FILE")
    if path:
        with open(path, "w") as file:
            json.dump({"message": message, "timestamp": str(int(time.time()))}, file)
