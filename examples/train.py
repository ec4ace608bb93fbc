"""Train a causal LM with standard or exact KA attention; defaults = the original study's protocol.

    python examples/train.py --attention standard --out runs/standard
    python examples/train.py --attention ka --out runs/ka
    python examples/train.py --attention ka@0-1 --text-file ../shared/data/wikitext-2-raw/train.txt \
        --val-text-file ../shared/data/wikitext-2-raw/valid.txt --out runs/wiki    # KA on layers 0 and 1 only
    python examples/train.py --resume runs/ka                  # continue an interrupted run
    python examples/train.py --resume runs/ka --overwrite      # restart it from scratch, same settings
    accelerate launch examples/train.py --attention ka --out runs/ka-gpus   # several GPUs

Writes the per-epoch table (epochs.md, results.json), curves.png and the best checkpoint (best/, with its
tokenizer and config.ka recording how it was trained). See docs/training.md.
"""

import argparse
import json
from pathlib import Path

from ka_hf.config import VARIANTS
from ka_hf.preflight import check_model_files, check_tokenizer_files, check_writable, read_json_file
from ka_hf.study.cli import (
    ATTENTION_HELP,
    ArgumentParser,
    accelerate_cpu,
    add_data_arguments,
    add_output_arguments,
    add_runtime_arguments,
    apply_runtime_flags,
    check_data_flags,
    check_numbers,
    on_interrupt,
    parse_attention,
    user_errors_exit_2,
)
from ka_hf.study.models import ARCHITECTURES
from ka_hf.study.training import (
    PRECISIONS,
    SCHEDULES,
    TRAINER_STATE,
    RunState,
    TrainConfig,
    check_config,
    load_train_config,
    train,
)

RESUME = "python examples/train.py --resume"


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Shows each option's default, except None and on/off switches."""

    def _get_help_string(self, action):
        text = action.help or ""
        shown = action.default not in (None, argparse.SUPPRESS) and not isinstance(action.default, bool)
        if shown and "default" not in text:
            text += f" (default: {action.default})"
        return text


def parse_args(argv=None):
    defaults = TrainConfig(out="")
    parser = ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    add_output_arguments(
        parser, what="the run's files (required unless --resume)", overwrite_note="; with --resume DIR: restart it"
    )
    parser.add_argument("--resume", metavar="DIR", help="continue the run in DIR with its saved settings")

    attention = parser.add_argument_group("attention")
    attention.add_argument("--attention", default=defaults.attention, help=f"attention to train: {ATTENTION_HELP}")
    attention.add_argument(
        "--variant",
        choices=VARIANTS,
        default=defaults.variant,
        help="KA variant; plan2 = the original's plan 2 (see docs/plan2.md)",
    )

    model = parser.add_argument_group("model (from scratch: --arch + shape or --model-config; fine-tune: --model)")
    model.add_argument("--arch", choices=ARCHITECTURES, default=defaults.arch, help="family, from scratch")
    for name in ("num_layers", "hidden_size", "num_heads", "num_kv_heads", "intermediate_size"):
        model.add_argument(
            "--" + name.replace("_", "-"), type=int, default=getattr(defaults, name), help="as Pythia-70M"
        )
    model.add_argument("--rotary-pct", type=float, default=defaults.rotary_pct, help="gpt-neox only")
    model.add_argument("--model-config", metavar="JSON", help="an HF config.json or ka_hf model_config kwargs")
    model.add_argument("--model", metavar="PATH_OR_ID", help="fine-tune this checkpoint instead")
    model.add_argument("--tokenizer", metavar="PATH_OR_ID", help="default: train a byte-level BPE on the data")
    model.add_argument("--vocab-size", type=int, default=defaults.vocab_size, help="of the trained tokenizer")

    data = add_data_arguments(
        parser,
        split=defaults.split,
        val_split=defaults.val_split,
        val_text_file=True,
        default="the offline corpus of stdlib docstrings; --val-text-file default: the last --val-fraction of "
        "--text-file",
    )
    data.add_argument(
        "--val-fraction",
        type=float,
        default=defaults.val_fraction,
        help="share of --text-file blocks that validate when there is no --val-text-file",
    )
    data.add_argument("--samples", type=int, default=defaults.samples, help="training blocks")
    data.add_argument("--val-samples", type=int, help="validation blocks (default: all)")
    data.add_argument("--seq-len", type=int, default=defaults.seq_len, help="tokens per block")

    optim = parser.add_argument_group("optimization (AdamW)")
    optim.add_argument("--epochs", type=int, default=defaults.epochs, help="at most")
    optim.add_argument(
        "--patience", type=int, default=defaults.patience, help="stop after this many epochs without a lower val PPL"
    )
    optim.add_argument("--batch-size", type=int, default=defaults.batch_size, help="blocks per step (per process)")
    optim.add_argument("--lr", type=float, default=defaults.lr, help="learning rate")
    optim.add_argument("--lr-schedule", choices=SCHEDULES, default=defaults.lr_schedule, help="after warmup")
    optim.add_argument("--warmup-steps", type=int, default=defaults.warmup_steps, help="linear warmup")
    optim.add_argument("--weight-decay", type=float, default=defaults.weight_decay, help="AdamW's")
    optim.add_argument("--max-grad-norm", type=float, default=defaults.max_grad_norm, help="gradient clipping")
    optim.add_argument("--seed", type=int, default=defaults.seed, help="init, data order, dropout")
    optim.add_argument("--mixed-precision", choices=PRECISIONS, default=defaults.mixed_precision, help="GPU only")
    add_runtime_arguments(parser, dtype=False)  # precision: --mixed-precision

    args = parser.parse_args(argv)
    if args.out is None and args.resume is None:
        parser.error("give --out DIR (or --resume DIR)")
    check_numbers(args, at_least=dict(threads=1))
    return args


@user_errors_exit_2
def main(argv=None):
    args = parse_args(argv)
    if args.resume is not None:
        config = load_train_config(args.resume)
        config.out, config.progress = args.resume, args.progress
    else:
        flags = {"resume", "overwrite", "device", "threads", "attention"}
        values = {key: value for key, value in vars(args).items() if key not in flags}
        attention, ka_layers = parse_attention(args.attention)
        config = TrainConfig(**values, attention=attention, ka_layers=ka_layers, cpu=accelerate_cpu(args.device))
    check_inputs(config, "--resume" if args.resume is not None else "--out")
    apply_runtime_flags(args)
    with on_interrupt(lambda: interrupted_note(config.out)):
        result = train(config, resume=args.resume is not None, overwrite=args.overwrite)
    if result.is_main_process:
        print((result.out_dir / "epochs.md").read_text())
        print(f"best checkpoint: {result.best_dir}")


def check_inputs(config: TrainConfig, option: str) -> None:
    """Every setting and file the run reads or writes, cheaply, before any work (train() itself refuses a folder
    that holds another run): the settings, the text files, the model to fine-tune, the tokenizer, the model config
    file, and that the run's folder is writable. With --resume: the files its saved settings name (they may have
    moved since)."""
    check_config(config)
    check_numbers(config, at_least=dict(val_samples=1))
    check_data_flags(config)
    if config.model is not None:
        check_model_files(config.model, "--model")
    if config.tokenizer is not None or config.model is not None:
        check_tokenizer_files(config.tokenizer or config.model, "--tokenizer" if config.tokenizer else "--model")
    if config.model_config is not None:
        read_json_file(config.model_config, "--model-config")
    check_writable(config.out, option)


def interrupted_note(out) -> str:
    """What a Ctrl-C leaves, and the command that goes on from there."""
    out = Path(out)
    state = out / "last" / TRAINER_STATE
    if state.is_file():
        epochs = RunState(**json.loads(state.read_text())).epochs_done
        return f"the checkpoint after epoch {epochs} is in {out / 'last'}; continue with: {RESUME} {out}"
    if (out / "train_config.json").is_file():
        return (
            f"no checkpoint yet in {out} (the first epoch had not ended); start it again with: "
            f"{RESUME} {out} --overwrite"
        )
    return f"nothing was written to {out}"


if __name__ == "__main__":
    main()
