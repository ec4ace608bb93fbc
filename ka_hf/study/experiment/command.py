"""`python -m ka_hf.experiment`: the study's command line."""

import argparse

from .config import PRESETS, ExperimentConfig
from .run import command_line, run_experiment


def main(argv=None):
    from ..cli import (
        accelerate_cpu,
        add_data_arguments,
        add_output_arguments,
        add_runtime_arguments,
        apply_runtime_flags,
        check_data_flags,
        on_interrupt,
        user_errors_exit_2,
    )

    parser = argparse.ArgumentParser(
        prog="python -m ka_hf.experiment", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--preset", default="quick", choices=list(PRESETS))
    add_output_arguments(parser, default="runs/quick", what="the report, results, models and plots")
    add_data_arguments(parser, val_text_file=True, default="the offline corpus; --val-text-file: the last tenth")
    parser.add_argument("--facts", type=int, help="number of reversal-curse facts mixed into training")
    parser.add_argument("--facts-include", choices=["forward", "backward", "both"])
    parser.add_argument("--fact-repeats", type=int, help="each fact sentence this many times per epoch")
    parser.add_argument("--epochs", type=int)
    parser.add_argument("--samples", type=int, help="training blocks")
    parser.add_argument("--seed", type=int, help="the first seed (default: the preset's, 0)")
    parser.add_argument(
        "--seeds",
        type=int,
        help="train and evaluate every model this many times (seeds seed, seed+1, ...); "
        "the report gives mean ± std and calls a difference only when it exceeds the spread (default 1)",
    )
    parser.add_argument(
        "--smoke",
        action="store_true",
        help="every stage of the preset for a handful of steps and windows: "
        "proves the preset runs (minutes on a CPU); its numbers mean nothing",
    )
    parser.add_argument("--test-text-file", help="the evaluation windows' text (default: the validation text)")
    add_runtime_arguments(parser, dtype=False)
    parser.add_argument(
        "--resume",
        action="store_true",
        help="continue an interrupted run in --out (same flags): finished steps are kept",
    )
    args = parser.parse_args(argv)

    @user_errors_exit_2
    def run():
        config = ExperimentConfig.from_preset(
            args.preset,
            args.out,
            text_file=args.text_file,
            val_text_file=args.val_text_file,
            dataset=args.dataset,
            dataset_config=args.dataset_config,
            text_column=args.text_column,
            facts=args.facts,
            facts_include=args.facts_include,
            fact_repeats=args.fact_repeats,
            epochs=args.epochs,
            samples=args.samples,
            seed=args.seed,
            seeds=args.seeds,
            smoke=args.smoke,
            test_text_file=args.test_text_file,
            cpu=None if args.device == "auto" else accelerate_cpu(args.device),  # None: the preset's
            progress=args.progress,
        )
        check_data_flags(args)
        apply_runtime_flags(args)  # after every check: a refusal is one line, with no note about threads before it

        def where():
            again = command_line(config) + ("" if "--resume" in command_line(config) else " --resume")
            return f"the run so far is in {config.out} (finished steps are kept); continue it with: {again}"

        with on_interrupt(where):
            record = run_experiment(config, overwrite=args.overwrite, resume=args.resume)
        print(f"\nreport: {record['files']['report']}\nresults: {record['files']['results']}")

    run()


if __name__ == "__main__":
    main()
