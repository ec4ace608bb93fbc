"""Fit a plan-1 adapter for a standard-trained model so that it runs on a KA cache; save it; measure it.

    python examples/fit_adapter.py --model runs/standard/best --out runs/standard/adapter
    python examples/fit_adapter.py --model runs/standard/best --distill-steps 200 --out runs/standard/adapter
    python examples/eval_ppl.py --model runs/standard/best --modes kv ka ka+adapter --adapter runs/standard/adapter

Steps: (a) closed-form least squares from A to V on the frozen model's activations over --samples training
blocks; (b) with --distill-steps N, N Adam steps minimizing KL(standard logits || KA+adapter logits) through the
exact KA recursion. Then PPL kv / ka / ka+adapter on --val-samples validation blocks, same model, same run.
Data: as in train.py; with no data flags, the data the model's config.ka says it was trained on (if local),
else the offline default corpus. See docs/training.md.
"""

import argparse
import copy
import json

import torch

from ka_hf.adapters import KAAdapter, save_adapter
from ka_hf.config import provenance
from ka_hf.study import files, report
from ka_hf.study.cli import user_errors_exit_2
from ka_hf.study.fit_adapters import check_fittable, compare_ppl, distill_adapter, fit_adapter_least_squares
from ka_hf.study.models import load_model, load_tokenizer
from ka_hf.study.records import AdapterFitRecord
from ka_hf.study.training import TrainConfig, load_data_texts, make_blocks


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="a standard-trained checkpoint (directory or Hub id)")
    parser.add_argument("--out", required=True, help="where to save the adapter")
    parser.add_argument("--overwrite", action="store_true", help="replace what --out already holds (an adapter)")
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
    data = parser.add_argument_group("data")
    for name in ("--dataset", "--dataset-config", "--text-file", "--val-text-file"):
        data.add_argument(name)
    data.add_argument("--split", default="train")
    data.add_argument("--val-split", default="validation")
    data.add_argument("--samples", type=int, default=256, help="blocks to fit (and distill) on")
    data.add_argument("--val-samples", type=int, default=64, help="blocks to measure PPL on")
    data.add_argument("--seq-len", type=int, default=128)
    data.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    files.check_out_dir(args.out, args.overwrite)  # before anything is loaded or written
    return args


def data_config(args, model) -> TrainConfig:
    """The data part of a TrainConfig: the flags, or the model's recorded training data when none are given."""
    values = dict(
        dataset=args.dataset,
        dataset_config=args.dataset_config,
        text_file=args.text_file,
        val_text_file=args.val_text_file,
        split=args.split,
        val_split=args.val_split,
    )
    recorded = provenance(model.config).get("training", {})
    if not any((args.dataset, args.text_file)) and (recorded.get("text_file") or recorded.get("dataset")):
        values.update({key: recorded.get(key) for key in ("dataset", "dataset_config", "text_file")})
        print(f"data: the model's training data ({recorded.get('text_file') or recorded.get('dataset')})")
    return TrainConfig(out=args.out, samples=args.samples, val_samples=args.val_samples, seq_len=args.seq_len, **values)


@user_errors_exit_2
def main(argv=None):
    args = parse_args(argv)
    torch.manual_seed(args.seed)
    model, tokenizer = load_model(args.model), load_tokenizer(args.model)
    check_fittable(model)  # before any data or fitting: an unsupported or KA-trained model is refused at once
    config = data_config(args, model)
    train_blocks, val_blocks = make_blocks(config, tokenizer, *load_data_texts(config)[:2])
    batches = list(train_blocks.split(args.batch_size))

    adapter = fit_adapter_least_squares(
        model, batches, KAAdapter.for_model(model, args.mlp_hidden), target=args.target, ridge=args.ridge, progress=True
    )
    adapters = {"ka+adapter (least squares)": copy.deepcopy(adapter)}
    if args.distill_steps:
        distill_adapter(model, adapter, batches, args.distill_steps, lr=args.lr)
        adapters["ka+adapter (distilled)"] = adapter

    results = compare_ppl(model, adapters, val_blocks, args.batch_size, progress=True)
    results_record = AdapterFitRecord(
        model=args.model,
        adapter=args.out,
        val_blocks=len(val_blocks),
        seq_len=args.seq_len,
        ppl=results,
        fit=adapter.fit_record,
        environment=report.environment(),
    )
    with files.staged_dir(args.out) as staging:  # the adapter and its results appear together, complete
        save_adapter(adapter, staging)
        files.write_json(staging / "results.json", results_record)
    print(json.dumps(results, indent=2))
    print(f"adapter saved to {args.out}")


if __name__ == "__main__":
    main()
