"""User errors: a bad flag, file or argument the user can fix, reported as one short message, not a traceback."""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Callable


class UserError(ValueError):
    """Something the user can fix; the message names the problem and the fix. Scripts exit with code 2."""


def run_script(main: Callable[[], object]) -> int:
    """Run a script's `main`; a UserError becomes `error: <message>` on stderr and exit code 2, no traceback.

    Anything else is a bug or a fault and keeps its traceback. An int that `main` returns is the exit code.
    """
    try:
        code = main()
    except UserError as error:
        print(f"error: {error}", file=sys.stderr, flush=True)
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
