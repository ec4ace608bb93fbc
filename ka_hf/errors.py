"""Errors, in two kinds.

- `KAError`: a user error — bad input, a missing file, an unsupported setup — with a message that says what to do
  instead. The scripts print it as one `error: ...` line and exit with status 2 (`user_errors_exit_2`).
- `KAInternalError`: a broken invariant inside ka_hf (a bug, not the user's input). It is never caught by the
  scripts, so it ends with a traceback to report.

Ctrl-C is neither: a script wrapped in `user_errors_exit_2` prints one `interrupted: ...` line (where the work so
far is and the command that continues it, when the script says so with `Interrupted`) and exits 130, the shell's
status for SIGINT, without the KeyboardInterrupt traceback.
"""

import functools
import os
import sys


class KAError(ValueError):
    """Bad input or an unsupported setup, with a message that says what to do instead."""


class KAInternalError(RuntimeError):
    """An invariant of ka_hf does not hold: a bug to report (with its traceback), not a problem with the input."""


class Interrupted(KeyboardInterrupt):
    """Ctrl-C, with a sentence saying what the user has and can do next (raised from the KeyboardInterrupt)."""


INTERRUPTED_EXIT = 130  # 128 + SIGINT, what a shell reports for a command stopped with Ctrl-C


def user_errors_exit_2(main):
    """Wrap a script's main(): a user error (KAError: bad input, missing files) prints one `error: ...` line to
    stderr and exits 2, no traceback; Ctrl-C prints one `interrupted: ...` line and exits 130. Anything else
    (KAInternalError, a bug) propagates with its traceback."""

    @functools.wraps(main)
    def wrapper(*args, **kwargs):
        try:
            return main(*args, **kwargs)
        except KAError as error:
            print("error: " + " ".join(str(error).splitlines()), file=sys.stderr)
            sys.exit(2)
        except KeyboardInterrupt as stop:
            if os.environ.get("RANK", "0") == "0":  # one line, from the main process of a multi-process run
                print("interrupted: " + (" ".join(str(stop).splitlines()) or "nothing was saved"), file=sys.stderr)
            sys.exit(INTERRUPTED_EXIT)

    return wrapper
