"""What the scripts share: user errors become one clear line and exit status 2, and the flags every script spells
and reads the same way (device, dtype, threads, progress, output folder, model and modes, data, layers)."""

import argparse

import torch

from ka_hf.errors import KAError, user_errors_exit_2  # noqa: F401 (the scripts import user_errors_exit_2 from here)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "float64": torch.float64}
DEVICE_KINDS = ("cpu", "cuda", "mps")
DEVICE_HELP = "auto (a CUDA GPU if there is one, else the CPU), cpu, cuda, cuda:N or mps"
ATTENTION_HELP = "standard, ka (every layer) or ka@LAYERS (e.g. ka@0-1 or ka@0,2: KA on those layers only)"


# ---------------------------------------------------------------------------------------------------------
# The shared flags: each added by one function, so that its spelling, default and help are the same everywhere


def add_model_arguments(parser, what: str = "the model") -> None:
    """--model (required) and --tokenizer."""
    parser.add_argument("--model", required=True, metavar="PATH_OR_HUB_ID", help=f"{what}: a local folder or Hub id")
    parser.add_argument("--tokenizer", metavar="PATH_OR_HUB_ID", help="default: the model's")


def add_model_and_mode_arguments(parser) -> None:
    """--model, --tokenizer, --modes, --adapter: the same meaning in every script that evaluates modes."""
    from ka_hf.modes import MODES_HELP

    add_model_arguments(parser)
    parser.add_argument("--modes", default="kv,ka,ka-hybrid", help=f"comma-separated: {MODES_HELP}")
    parser.add_argument("--adapter", metavar="DIR", help="a saved plan-1 adapter, for the ka+adapter mode")


def add_runtime_arguments(parser, dtype: bool = True, progress: bool = True) -> argparse._ArgumentGroup:
    """--device, --dtype (when the script loads weights in a chosen dtype), --threads, --no-progress; --cpu is
    kept as the old spelling of --device cpu. Read them back with `device_of(args)` and `apply_runtime_flags(args)`."""
    group = parser.add_argument_group("hardware")
    group.add_argument("--device", default="auto", help=DEVICE_HELP + " (default: auto)")
    group.add_argument("--cpu", dest="device", action="store_const", const="cpu", help="the same as --device cpu")
    if dtype:
        group.add_argument("--dtype", default="float32", choices=tuple(DTYPES), help="weights dtype (default: float32)")
    group.add_argument("--threads", type=int, metavar="N", help="torch CPU threads (per process)")
    if progress:  # (only where there are progress bars to turn off)
        group.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bars")
    return group


def add_output_arguments(
    parser,
    default: str | None = None,
    what: str = "the results",
    required: bool = False,
    overwrite_note: str = "",
    aliases: tuple[str, ...] = (),
    file: bool = False,
):
    """--out DIR (or FILE, for a script that writes one file; also spelled as `aliases`, older names) and
    --overwrite: existing results there are refused unless --overwrite (files.check_out_dir / check_out_file)."""
    shown = f" (default: {default})" if default else ""
    kind = "file" if file else "folder"
    help_text = f"the {kind} {what} go to{shown}"
    metavar = kind.upper() if file else "DIR"
    parser.add_argument(
        "--out", *aliases, dest="out", default=default, required=required, metavar=metavar, help=help_text
    )
    parser.add_argument(
        "--overwrite",
        action="store_true",
        help="replace what --out already holds (without it, earlier results there are refused)" + overwrite_note,
    )


def add_data_arguments(
    parser, split: str | None = None, val_split: str | None = None, val_text_file: bool = False, default: str = ""
):
    """--dataset, --dataset-config, --text-file, --text-column; --split / --val-split with these defaults when
    given; --val-text-file when the script scores held-out text. `default` says what the script reads when neither
    --dataset nor --text-file is given (the offline corpus, or the model's recorded data)."""
    group = parser.add_argument_group(f"data (default: {default})" if default else "data")
    group.add_argument(
        "--dataset", metavar="NAME", help="a Hub dataset name (needs the network), e.g. Salesforce/wikitext"
    )
    group.add_argument("--dataset-config", metavar="NAME", help="its configuration, e.g. wikitext-2-raw-v1")
    if split is not None:
        group.add_argument("--split", default=split, help=f"the split of --dataset to read (default: {split})")
    if val_split is not None:
        group.add_argument(
            "--val-split", default=val_split, help=f"the held-out split of --dataset (default: {val_split})"
        )
    group.add_argument(
        "--text-file", metavar="FILE", help="a local .txt (one text per line), .jsonl, .json or .parquet file"
    )
    if val_text_file:
        group.add_argument("--val-text-file", metavar="FILE", help="held-out validation text, a file of the same kinds")
    group.add_argument(
        "--text-column", default="text", help="the text column of .jsonl/.json/.parquet files (default: text)"
    )
    return group


# ---------------------------------------------------------------------------------------------------------
# Reading them back


def resolve_device(name: str) -> torch.device:
    """The torch device `--device name` means; KAError for a name that is not a device or is not present here."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError):
        device = None
    if device is None or device.type not in DEVICE_KINDS:
        raise KAError(f"--device {name!r} is not a device: use {DEVICE_HELP}")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise KAError(f"--device {name}: there is no CUDA GPU here: use --device cpu (or auto)")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise KAError(f"--device {name}: there are only {torch.cuda.device_count()} CUDA GPU(s) here (cuda:0 ...)")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise KAError(f"--device {name}: MPS is not available here: use --device cpu (or auto)")
    return device


def device_of(args) -> torch.device:
    """The device of a script's --device flag (checked)."""
    return resolve_device(args.device)


def accelerate_cpu(name: str) -> bool:
    """For the scripts that run under accelerate (which places every process on its own device): True when
    `--device name` means the CPU. A single GPU is chosen with CUDA_VISIBLE_DEVICES, not --device cuda:N."""
    device = resolve_device(name)
    if device.type == "cuda" and device.index is not None:
        raise KAError(
            f"--device {name}: this script places its processes with accelerate: choose the GPU with "
            f"CUDA_VISIBLE_DEVICES={device.index} and --device cuda"
        )
    return device.type == "cpu"


def apply_runtime_flags(args) -> None:
    """torch.set_num_threads(--threads) when given (KAError for fewer than one); with --no-progress, also the
    progress bars of transformers and datasets (loading weights, reading files) are turned off."""
    if args.threads is not None:
        if args.threads < 1:
            raise KAError(f"--threads {args.threads}: give at least 1")
        torch.set_num_threads(args.threads)
    if not getattr(args, "progress", True):
        from transformers.utils import logging

        logging.disable_progress_bar()
        try:
            from datasets.utils.logging import disable_progress_bar
        except ImportError:  # datasets is needed only to read data files
            return
        disable_progress_bar()


def parse_attention(text: str) -> tuple[str, list[int] | None]:
    """--attention standard | ka | ka@LAYERS -> (attention, KA layers or None for all), through the one mode
    parser, so that layers are written as in every --modes list."""
    from ka_hf.modes import parse_mode

    if text == "standard":
        return "standard", None
    try:
        mode = parse_mode(text)
    except KAError:
        mode = None
    if mode is None or mode.kind != "ka":
        raise KAError(f"--attention {text!r}: use {ATTENTION_HELP}")
    return "ka", None if mode.layers is None else list(mode.layers)
