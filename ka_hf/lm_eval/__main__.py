"""`python -m ka_hf.lm_eval ...`: lm-evaluation-harness's command line, with `--model ka_hf` registered.

A user error (a bad ka_mode, a missing adapter, a `pretrained=` that is not a model that loads, an --output_path
that cannot be written) prints one `error:` line and exits 2, as the other scripts do, before any task or model
loads.
"""

from pathlib import Path

from ka_hf.errors import user_errors_exit_2
from ka_hf.preflight import check_model_files, check_writable

from . import KALM  # noqa: F401 (importing it registers --model ka_hf)
from .model import MODEL_NAME, check_lm_eval_mode


@user_errors_exit_2
def main() -> None:
    from lm_eval.__main__ import HarnessCLI, setup_logging  # what lm_eval.__main__.cli_evaluate runs

    setup_logging()
    parser = HarnessCLI()
    args = parser.parse_args()
    check_args(args)
    parser.execute(args)


def check_args(args) -> None:
    """ka_hf's checks of lm-eval's parsed flags: with --model ka_hf, its model (pretrained=, cheaply:
    ka_hf.preflight), ka_mode and adapter; for every model, that --output_path can be written."""
    model_args = getattr(args, "model_args", None) or {}
    if getattr(args, "model", None) == MODEL_NAME:
        if "pretrained" in model_args:
            check_model_files(str(model_args["pretrained"]), "pretrained=")
        check_lm_eval_mode(model_args.get("ka_mode", "ka"), model_args.get("adapter"))
    if getattr(args, "output_path", None):
        path = Path(args.output_path)
        check_writable(path.parent if path.suffix == ".json" else path, "--output_path", chosen=path)


if __name__ == "__main__":
    main()
