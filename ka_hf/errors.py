"""Errors, in two kinds.

- `KAError`: a user error — bad input, a missing file, an unsupported setup — with a message that says what to do
  instead. The scripts print it as one `error: ...` line and exit with status 2 (`ka_hf.study.cli`).
- `KAInternalError`: a broken invariant inside ka_hf (a bug, not the user's input). It is never caught by the
  scripts, so it ends with a traceback to report.
"""


class KAError(ValueError):
    """Bad input or an unsupported setup, with a message that says what to do instead."""


KAUserError = KAError  # the same class, by the name that says which kind it is


class KAInternalError(RuntimeError):
    """An invariant of ka_hf does not hold: a bug to report (with its traceback), not a problem with the input."""
