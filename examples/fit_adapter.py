"""Fit a plan-1 adapter for a standard-trained model so that it runs on a KA cache; save it; measure it.

    python examples/fit_adapter.py --model runs/standard/best --out runs/standard/adapter
    python examples/fit_adapter.py --model runs/standard/best --distill-steps 200 --out runs/standard/distilled
    python examples/eval_ppl.py --model runs/standard/best --modes kv,ka,ka+adapter --adapter runs/standard/adapter \\
        --out runs/standard/adapter-eval

Steps: (a) closed-form least squares from A to V on the frozen model's activations over --samples training
blocks; (b) with --distill-steps N, N Adam steps minimizing KL(standard logits || KA+adapter logits) through the
exact KA recursion. Then PPL kv / ka / ka+adapter on --val-samples held-out blocks, same model, same run.

Data: with no data flags, the data the model's config.ka_provenance["training"] records (what examples/train.py
and the study write): it fits on the training text and scores the text that training held out (its
--val-text-file, validation split, or the last --val-fraction of its --text-file) at the model's own training
--seq-len, and says which. A model that records neither needs --text-file (or --dataset) and --seq-len; give
--val-text-file to score other held-out text. See docs/training.md.
"""

import argparse
import copy
import json
from types import SimpleNamespace

import torch

from ka_hf.adapters import KAAdapter, save_adapter
from ka_hf.config import provenance
from ka_hf.errors import KAError
from ka_hf.study import files, report
from ka_hf.study.cli import (
    DTYPES,
    ArgumentParser,
    add_data_arguments,
    add_model_arguments,
    add_output_arguments,
    add_runtime_arguments,
    apply_runtime_flags,
    check_data_flags,
    check_model_flags,
    check_numbers,
    device_of,
    on_interrupt,
    user_errors_exit_2,
)
from ka_hf.study.fit_adapters import check_fittable, compare_ppl, distill_adapter, fit_adapter_least_squares
from ka_hf.study.models import load_model, load_tokenizer
from ka_hf.study.records import AdapterFitRecord
from ka_hf.study.training import TrainConfig, load_data_texts, make_blocks

DATA_KEYS = ("dataset", "dataset_config", "split", "val_split", "text_file", "val_text_file", "text_column")


def parse_args(argv=None):
    parser = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_arguments(parser, what="a standard-trained checkpoint")
    add_output_arguments(parser, what="the adapter and its results.json", required=True)
    parser.add_argument(
        "--target",
        choices=("attention", "values"),
        default="attention",
        help="least-squares target (see ka_hf.study.fit_adapters.fit_adapter_least_squares)",
    )
    parser.add_argument("--ridge", type=float, default=1e-4)
    parser.add_argument("--mlp-hidden", type=int, default=0, help="add a residual MLP of this width (distilled)")
    parser.add_argument("--distill-steps", type=int, default=0)
    parser.add_argument("--lr", type=float, default=1e-3, help="distillation learning rate")
    parser.add_argument("--batch-size", type=int, default=8)
    data = add_data_arguments(
        parser, split="train", val_split="validation", val_text_file=True, default="the model's recorded data"
    )
    data.add_argument("--samples", type=int, default=256, help="blocks to fit (and distill) on")
    data.add_argument("--val-samples", type=int, default=64, help="held-out blocks to measure PPL on")
    data.add_argument("--seq-len", type=int, help="tokens per block (default: the model's training --seq-len)")
    data.add_argument("--seed", type=int, default=0)
    add_runtime_arguments(parser)
    args = parser.parse_args(argv)
    counts = dict(batch_size=1, samples=1, val_samples=1, seq_len=2, distill_steps=0, mlp_hidden=0, threads=1)
    check_numbers(args, at_least=counts | dict(ridge=0), above=dict(lr=0))
    device_of(args)  # a device that is not here fails now
    return args


def check_inputs(args) -> tuple[TrainConfig, str]:
    """Every file the run reads or writes, cheaply, before any work: the model (config and weights' headers; one
    an adapter can be fit for), its tokenizer, the text files (the flags' or the model's recorded ones), --out
    (earlier results, writable). Returns data_config's (TrainConfig, held-out text)."""
    config = check_model_flags(args)
    check_fittable(SimpleNamespace(config=config))  # (it reads the model's config only)
    check_data_flags(args)
    data, held_out = data_config(args, config)
    check_data_flags(data)  # the model's recorded text files may have moved since it was trained
    files.check_out_dir(args.out, args.overwrite)
    return data, held_out


def data_config(args, model_config) -> tuple[TrainConfig, str]:
    """The data part of a TrainConfig (the flags, else the model's recorded training data) and a sentence saying
    which text is held out and at which sequence length. KAError when there is no held-out text to score."""
    recorded = provenance(model_config).get("training", {})
    values = {key: getattr(args, key) for key in DATA_KEYS}
    val_fraction = TrainConfig(out="").val_fraction
    if not (args.dataset or args.text_file):
        if not recorded:
            raise KAError(
                f"{args.model} does not record the data it was trained on (config.ka_provenance['training']): "
                "give --text-file FILE (or --dataset NAME) and --val-text-file FILE, held-out text to score on"
            )
        values.update({key: recorded[key] for key in DATA_KEYS if recorded.get(key) is not None})
        values["val_text_file"] = args.val_text_file or recorded.get("val_text_file")
        val_fraction = recorded.get("val_fraction", val_fraction)
        if values["text_file"] and not values["val_text_file"] and "val_fraction" not in recorded:
            raise KAError(
                f"{args.model} records its training file {values['text_file']} but not which text it held out: "
                "give --val-text-file FILE, held-out text to score on"
            )
    seq_len = args.seq_len if args.seq_len is not None else recorded.get("seq_len")
    if seq_len is None:
        raise KAError(f"{args.model} does not record its training sequence length: give --seq-len N")
    config = TrainConfig(
        out=args.out,
        samples=args.samples,
        val_samples=args.val_samples,
        seq_len=seq_len,
        val_fraction=val_fraction,
        **values,
    )
    return config, held_out_text(config, "flags" if args.dataset or args.text_file else "the model's record")


def held_out_text(config: TrainConfig, source: str) -> str:
    """Which text the PPL is measured on, in words."""
    if config.val_text_file:
        text = config.val_text_file
    elif config.text_file:
        text = f"the last {config.val_fraction:.0%} of {config.text_file}'s blocks (the training run's split)"
    elif config.dataset:
        text = f"{config.dataset} [{config.val_split}]"
    else:
        text = f"the offline default corpus [{config.val_split}]"
    return f"{text}, blocks of {config.seq_len} tokens (data from {source})"


@user_errors_exit_2
def main(argv=None):
    args = parse_args(argv)
    config, held_out = check_inputs(args)
    apply_runtime_flags(args)
    with on_interrupt(lambda: f"nothing was written to {args.out} (the adapter is saved once it is fit and scored)"):
        adapter, results_record = fit_and_score(args, config, held_out)

    def write(folder):
        with files.staged_dir(folder) as staging:  # the adapter and its results appear together, complete
            save_adapter(adapter, staging)
            files.write_json(staging / "results.json", results_record)

    files.write_results(args.out, write)
    print(json.dumps(results_record.ppl, indent=2))
    print(f"held-out text: {held_out}")
    print(f"adapter saved to {args.out}")


def fit_and_score(args, config: TrainConfig, held_out: str):
    """(the fitted adapter, its AdapterFitRecord): least squares, then distillation with --distill-steps, then PPL
    kv / ka / ka+adapter on the held-out blocks."""
    torch.manual_seed(args.seed)
    model = load_model(args.model, dtype=DTYPES[args.dtype], device=device_of(args))
    tokenizer = load_tokenizer(args.tokenizer or args.model)
    print(f"held-out text: {held_out}")
    train_blocks, val_blocks = make_blocks(config, tokenizer, *load_data_texts(config)[:2])
    batches = list(train_blocks.split(args.batch_size))

    identity = KAAdapter.for_model(model, args.mlp_hidden).to(model.dtype)  # on the model's device and dtype
    adapter = fit_adapter_least_squares(
        model, batches, identity, target=args.target, ridge=args.ridge, progress=args.progress
    )
    adapters = {"ka+adapter (least squares)": copy.deepcopy(adapter)}
    if args.distill_steps:
        distill_adapter(model, adapter, batches, args.distill_steps, lr=args.lr, progress=args.progress)
        adapters["ka+adapter (distilled)"] = adapter

    results = compare_ppl(model, adapters, val_blocks, args.batch_size, progress=args.progress)
    record = AdapterFitRecord(
        model=args.model,
        adapter=args.out,
        val_blocks=len(val_blocks),
        seq_len=config.seq_len,
        ppl=results,
        fit=adapter.fit_record,
        environment=report.environment(),
        extra={"held_out_text": held_out},
    )
    return adapter, record


if __name__ == "__main__":
    main()
