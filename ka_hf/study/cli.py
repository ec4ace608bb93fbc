"""What the example scripts share: user errors become one clear line and exit status 2; the flags that name a
model and its inference modes."""

import functools
import sys

from ka_hf.errors import KAError


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


def add_model_and_mode_arguments(parser) -> None:
    """--model, --tokenizer, --modes, --adapter: the same meaning in every script that evaluates modes."""
    from .evaluation.modes import MODES_HELP

    parser.add_argument("--model", required=True, metavar="PATH_OR_HUB_ID")
    parser.add_argument("--tokenizer", metavar="PATH_OR_HUB_ID", help="default: the model's")
    parser.add_argument("--modes", default="kv,ka,ka-hybrid", help=f"comma-separated: {MODES_HELP}")
    parser.add_argument("--adapter", metavar="DIR", help="a saved plan-1 adapter, for the ka+adapter mode")
