"""What every example script shares: user errors become one clear line and exit status 2."""

import functools
import sys

from .errors import KAError


def user_errors_exit_2(main):
    """Wrap a script's main(): a KAError (bad input) prints `error: ...` to stderr and exits 2, no traceback."""

    @functools.wraps(main)
    def wrapper(*args, **kwargs):
        try:
            return main(*args, **kwargs)
        except KAError as error:
            print(f"error: {error}", file=sys.stderr)
            sys.exit(2)

    return wrapper
