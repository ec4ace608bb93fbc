"""`python -m ka_hf.lm_eval ...`: lm-evaluation-harness's command line, with `--model ka_hf` registered.

A user error (a bad ka_mode, a missing adapter) prints one `error:` line and exits 2, as the other scripts do.
"""

from ka_hf.errors import user_errors_exit_2

from . import KALM  # noqa: F401 (importing it registers --model ka_hf)


@user_errors_exit_2
def main() -> None:
    from lm_eval.__main__ import cli_evaluate

    cli_evaluate()


if __name__ == "__main__":
    main()
