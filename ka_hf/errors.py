"""Errors, in two kinds.

- `KAError`: a user error — bad input, a missing file, an unsupported setup — with a message that says what to do
  instead. The scripts print it as one `error: ...` line and exit with status 2 (`user_errors_exit_2`).
- `KAInternalError`: a broken invariant inside ka_hf (a bug, not the user's input). It is never caught by the
  scripts, so it ends with a traceback to report.
"""

import functools
import sys


class KAError(ValueError):
    """Bad input or an unsupported setup, with a message that says what to do instead."""


class KAInternalError(RuntimeError):
    """An invariant of ka_hf does not hold: a bug to report (with its traceback), not a problem with the input."""


def user_errors_exit_2(main):
    """Wrap a script's main(): a user error (KAError: bad input, missing files) prints one `error: ...` line to
    stderr and exits 2, no traceback. Anything else (KAInternalError, a bug) propagates with its traceback."""

    @functools.wraps(main)
    def wrapper(*args, **kwargs):
        try:
            return main(*args, **kwargs)
        except KAError as error:
            print("error: " + " ".join(str(error).splitlines()), file=sys.stderr)
            sys.exit(2)

    return wrapper
