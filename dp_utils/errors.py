"""User errors: a bad flag, file or argument the user can fix, reported as one short message, not a traceback."""

from __future__ import annotations

import sys
from collections.abc import Callable


class UserError(ValueError):
    """Something the user can fix; the message names the problem and the fix. Scripts exit with code 2."""


def run_script(main: Callable[[], object]) -> int:
    """Run a script's `main`; a UserError becomes `error: <message>` on stderr and exit code 2, no traceback.

    Anything else is a bug or a fault and keeps its traceback.
    """
    try:
        main()
    except UserError as error:
        print(f"error: {error}", file=sys.stderr, flush=True)
        return 2
    return 0
