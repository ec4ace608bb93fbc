"""Perplexity of KV caching vs KA caching on the same model, the same token windows, in the same run.

    python examples/eval_ppl.py --model runs/standard/best --modes kv,ka,ka-hybrid --out runs/standard/eval
    python examples/eval_ppl.py --model runs/standard/best --text-file ../shared/data/wikitext-2-raw/test.txt \
        --max-length 128 --stride 64 --layer-sweep --out runs/standard/eval-wikitext
    accelerate launch examples/eval_ppl.py --model runs/standard/best --modes kv,ka --out R    # GPUs
    torchrun --nproc_per_node 2 examples/eval_ppl.py --model runs/standard/best --out R        # 2 CPU processes

Modes: kv, ka, ka-hybrid, ka@LAYERS (ka@0-2, ka@0,1,2), ka+adapter (with --adapter DIR). Writes results.json,
results.md, nll_by_position.png (+ nll_gap_by_position.png, layer_sweep.png) to --out. See docs/evaluation.md.
"""

import argparse
import sys

from ka_hf.study.cli import (
    ArgumentParser,
    add_data_arguments,
    add_model_and_mode_arguments,
    add_output_arguments,
    add_runtime_arguments,
    on_interrupt,
    user_errors_exit_2,
)
from ka_hf.study.evaluation import METHODS, SWEEPS, PplRun, run_ppl_eval


def parse_args(argv=None):
    parser = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_and_mode_arguments(parser)
    add_output_arguments(parser, default="eval_ppl_out", what="results.json/.md and the plots")
    add_data_arguments(parser, split="test", default="the offline corpus, ka_hf.study.data.default_corpus")

    windows = parser.add_argument_group("windows (as in the HF perplexity guide)")
    windows.add_argument("--max-length", type=int, default=128, help="tokens per window")
    windows.add_argument("--stride", type=int, default=128, help="a window starts every STRIDE tokens")
    windows.add_argument("--max-windows", type=int, help="score only the first N windows (quick runs)")

    run = parser.add_argument_group("run")
    run.add_argument(
        "--method",
        choices=METHODS,
        default="parallel",
        help="parallel: one forward per window; token: token by token through the cache (decode tokens/s)",
    )
    run.add_argument(
        "--layer-sweep",
        nargs="?",
        const="prefix",
        choices=SWEEPS,
        help="also PPL with KA on layers [0..k] for every k (prefix, the default) or on layer k alone",
    )
    run.add_argument("--batch-size", type=int, default=1, help="windows per forward (right padding)")
    run.add_argument("--mixed-precision", choices=("no", "fp16", "bf16"), help="default: accelerate's config")
    run.add_argument("--seed", type=int, default=0)
    add_runtime_arguments(parser)
    return parser.parse_args(argv)


@user_errors_exit_2
def main(argv=None):
    args = parse_args(argv)
    run = PplRun(**vars(args))
    with on_interrupt(lambda: f"no results were written to {args.out} (they are written when every mode is scored)"):
        result = run_ppl_eval(run)  # checks every flag and input first (check_run), before any work
    if result is not None:  # the main process
        print(result["summary"])


if __name__ == "__main__":
    sys.exit(main())
