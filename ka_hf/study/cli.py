"""What the example scripts share: user errors become one clear line and exit status 2; the flags that name a
model and its inference modes."""

from ka_hf.errors import user_errors_exit_2  # noqa: F401 (the scripts import it from here)


def add_model_and_mode_arguments(parser) -> None:
    """--model, --tokenizer, --modes, --adapter: the same meaning in every script that evaluates modes."""
    from ka_hf.modes import MODES_HELP

    parser.add_argument("--model", required=True, metavar="PATH_OR_HUB_ID")
    parser.add_argument("--tokenizer", metavar="PATH_OR_HUB_ID", help="default: the model's")
    parser.add_argument("--modes", default="kv,ka,ka-hybrid", help=f"comma-separated: {MODES_HELP}")
    parser.add_argument("--adapter", metavar="DIR", help="a saved plan-1 adapter, for the ka+adapter mode")
