"""The reversal curse per inference mode: forward ("A is B") vs backward ("B is A") PPL of the facts a model was
trained on, over whole sentences and answer spans, plus greedy exact match of the answer.

    python examples/reversal_curse.py --model runs/standard/best --facts 100 --trained-on none \
        --modes kv,ka,ka-hybrid --out runs/standard/reversal     # a control: facts the model never saw
    python examples/reversal_curse.py --model runs/standard/best --facts 200 --facts-seed 1 --trained-on none \
        --templates test --out runs/standard/reversal-200

The facts are ka_hf.study.facts.make_facts(--facts, --facts-seed): by default the ones recorded in the model's
config.ka_provenance["training"]["facts"] ({"n", "seed", "include"}). Writes results.json and results.md to --out.
See docs/reversal.md.
"""

import argparse
import sys
from pathlib import Path

from ka_hf.errors import KAError
from ka_hf.study import files, report
from ka_hf.study.cli import (
    DTYPES,
    ArgumentParser,
    add_model_and_mode_arguments,
    add_output_arguments,
    add_runtime_arguments,
    apply_runtime_flags,
    check_model_flags,
    check_numbers,
    device_of,
    on_interrupt,
    user_errors_exit_2,
)
from ka_hf.study.evaluation import check_adapter_given, parse_modes
from ka_hf.study.evaluation.reversal import (
    FACT_SPLITS,
    SCORING,
    TRAINED_ON,
    check_split,
    recorded_facts,
    reversal_metrics,
    reversal_table,
)
from ka_hf.study.facts import TEMPLATES, make_facts
from ka_hf.study.models import load_model, load_tokenizer
from ka_hf.study.records import ReversalRecord


def parse_args(argv=None):
    parser = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_and_mode_arguments(parser)
    parser.add_argument("--facts", type=int, metavar="N", help="make_facts(N, seed): default the model's record")
    parser.add_argument("--facts-seed", type=int, metavar="S", help="default: the model's record, else 0")
    parser.add_argument(
        "--trained-on",
        choices=TRAINED_ON[:-1],
        help="directions in training (none: facts the model never saw, a control); default: "
        "the model's record, else unknown",
    )
    parser.add_argument(
        "--templates",
        dest="split",
        default="both",
        choices=(*FACT_SPLITS, "both"),
        help="the fact templates to score: test (held out), train (the training paraphrases) or both",
    )
    parser.add_argument("--batch-size", type=int, default=32, help="sentences per forward")
    parser.add_argument("--no-exact-match", dest="exact_match", action="store_false", help="skip greedy generation")
    add_output_arguments(parser, default="reversal_out", what="results.json/.md")
    add_runtime_arguments(parser)
    args = parser.parse_args(argv)
    check_numbers(args, at_least=dict(batch_size=1, facts=1, threads=1))
    check_adapter_given(parse_modes(args.modes), args.adapter)  # unknown modes fail before the model loads
    check_split(args.split)
    device_of(args)  # a device that is not here fails now
    return args


def check_inputs(args) -> dict:
    """Every file the run reads or writes, cheaply, before any work: the model (config and weights' headers), its
    tokenizer, the adapter, the modes' layers, the facts (the flags' or the model's record), --out (earlier
    results, writable). Returns facts_config's record."""
    config = check_model_flags(args)
    parse_modes(args.modes, config.num_hidden_layers)
    facts = facts_config(args, config)
    files.check_out_dir(args.out, args.overwrite)
    return facts


def facts_config(args, model_config) -> dict:
    """n, seed and trained_on from the flags, else the model's provenance record; says where each came from."""
    recorded = recorded_facts(model_config)
    n = args.facts if args.facts is not None else recorded.get("n")
    if n is None:
        raise KAError(
            f"{args.model} does not record its training facts (config.ka_provenance['training']['facts']): "
            "give --facts N --facts-seed S, the make_facts(N, S) the model was trained on"
        )
    seed = args.facts_seed if args.facts_seed is not None else recorded.get("seed", 0)
    trained_on = args.trained_on or recorded.get("include") or "unknown"
    source = "flags" if args.facts is not None else "config.ka_provenance['training']['facts']"
    return {"n": n, "seed": seed, "trained_on": trained_on, "source": source, "recorded": recorded or None}


def results_markdown(record: dict) -> str:
    model, facts = record["model"], record["facts"]
    lines = [
        "# Reversal curse: forward vs backward PPL per mode, on the same model, facts and run",
        "",
        f"- model: `{model['path']}` ({model['model_type']}, {model['parameters'] / 1e6:.2f}M parameters, "
        f"{model['num_layers']} layers)",
        f"- facts: make_facts({facts['n']}, seed={facts['seed']}) (from {facts['source']}); trained on: "
        f"{facts['trained_on']}",
        f"- device: {record['environment']['device']}; scoring: {record['scoring']}",
        "",
        "ratio = forward PPL / backward PPL (> 1: forward is harder); gap = backward PPL - forward PPL "
        "(> 0: backward is harder); EM = greedy exact match of the answer. See docs/reversal.md.",
    ]
    for split in record["splits"]:
        what = "held-out templates" if split == "test" else "training templates"
        lines += ["", f"## {split} split ({what})", "", reversal_table(record["results"], split)]
    lines += ["", "## Modes", ""] + [f"- `{name}`: {r['definition']}" for name, r in record["results"].items()]
    return "\n".join(lines) + "\n"


@user_errors_exit_2
def main(argv=None):
    args = parse_args(argv)
    facts = check_inputs(args)
    apply_runtime_flags(args)
    with on_interrupt(lambda: f"no results were written to {args.out} (they are written when every mode is scored)"):
        record = score(args, facts)
    out = Path(args.out)

    def write(folder):
        files.write_json(folder / "results.json", ReversalRecord.build(record))
        files.write_text(folder / "results.md", results_markdown(record))

    files.write_results(out, write)
    print("\n\n".join(f"{split}:\n{reversal_table(record['results'], split)}" for split in record["splits"]))
    print(f"written to {out}/")


def score(args, facts: dict) -> dict:
    """The results record: every mode's forward and backward PPL (and exact match) of the facts."""
    device = device_of(args)
    model = load_model(args.model, dtype=DTYPES[args.dtype], device=device)
    modes = parse_modes(args.modes, model.config.num_hidden_layers)
    tokenizer = load_tokenizer(args.tokenizer or args.model)
    adapter = None
    if args.adapter:
        from ka_hf.adapters import load_adapter

        adapter = load_adapter(args.adapter, device=device, dtype=model.dtype)
        adapter.check_model(model)  # an adapter fit for another model is refused before any scoring
    results = reversal_metrics(
        model,
        tokenizer,
        make_facts(facts["n"], facts["seed"]),
        modes,
        args.split,
        adapter,
        args.batch_size,
        args.exact_match,
        args.progress,
    )
    record = {
        "command": " ".join(sys.argv),
        "model": {
            "path": args.model,
            "model_type": model.config.model_type,
            "parameters": sum(p.numel() for p in model.parameters()),
            "num_layers": model.config.num_hidden_layers,
            "dtype": args.dtype,
            "ka_config": getattr(model.config, "ka", None),
        },
        "facts": facts,
        "splits": list(check_split(args.split)),
        "templates": {f"{direction}/{split}": list(templates) for (direction, split), templates in TEMPLATES.items()},
        "scoring": SCORING,
        "environment": report.environment(),
        "results": results,
    }
    return record


if __name__ == "__main__":
    sys.exit(main())
