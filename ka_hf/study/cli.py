"""What the scripts share: user errors become one clear line and exit status 2 (Ctrl-C one line and 130), the
flags every script spells and reads the same way (device, dtype, threads, progress, output folder, model and
modes, data, layers), and the checks of what they read, run before any work."""

import argparse
import contextlib
import os
import sys

import torch

from ka_hf.errors import Interrupted, KAError, user_errors_exit_2  # noqa: F401 (the scripts import it from here)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "float64": torch.float64}
DEVICE_KINDS = ("cpu", "cuda", "mps")
DEVICE_HELP = "auto (a CUDA GPU if there is one, else the CPU), cpu, cuda, cuda:N or mps"
THREADS_HELP = (
    "torch CPU threads per process (default: OMP_NUM_THREADS, else the cores this process may use, fewer when "
    "the load average says other processes hold some of them)"
)
ATTENTION_HELP = "standard, ka (every layer) or ka@LAYERS (e.g. ka@0-1 or ka@0,2: KA on those layers only)"


class ArgumentParser(argparse.ArgumentParser):
    """argparse's parser, except that a bad command line (an unknown flag, a missing or malformed value) is one
    `error:` line saying where the flags are described, and exit status 2, like every other user error."""

    def error(self, message):
        print(f"error: {message} (see {self.prog} --help)", file=sys.stderr)
        sys.exit(2)


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
    group.add_argument("--threads", type=int, metavar="N", help=THREADS_HELP)
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
    """torch.set_num_threads(--threads) when given (KAError for fewer than one), else `default_threads()`'s
    (one line on stderr when it is below torch's own default); the count used is written back to args.threads,
    so that a results record holds it. With --no-progress, also the progress bars of transformers and datasets
    (loading weights, reading files) are turned off."""
    if args.threads is not None:
        if args.threads < 1:
            raise KAError(f"--threads {args.threads}: give at least 1")
        torch.set_num_threads(args.threads)
    else:
        threads, note = default_threads()
        if note:
            print(note, file=sys.stderr)
        torch.set_num_threads(threads)
        args.threads = threads
    if not getattr(args, "progress", True):
        from transformers.utils import logging

        logging.disable_progress_bar()
        try:
            from datasets.utils.logging import disable_progress_bar
        except ImportError:  # datasets is needed only to read data files
            return
        disable_progress_bar()


def default_threads() -> tuple[int, str | None]:
    """(threads, a note or None): torch's own count (OMP_NUM_THREADS when set, else the cores of this process's
    CPU affinity), lowered to the cores left free by other processes (the 1-minute load average) unless
    OMP_NUM_THREADS chose it. Why: torch's threads wait for each other at every op, so one thread on a busy core
    stalls them all; eval_ppl.py ran 7-90x slower with 2 threads than with 1 on a busy 2-core machine
    (benchmarks/bench_threads.py), while a second thread gains at most 2x on an idle one."""
    threads = torch.get_num_threads()
    if threads == 1 or os.environ.get("OMP_NUM_THREADS") or not hasattr(os, "getloadavg"):
        return threads, None
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or threads
    load = os.getloadavg()[0]
    free = max(1, round(cores - load))
    if free >= threads:
        return threads, None
    return free, (
        f"torch threads: {free} of {threads} (load average {load:.1f} on {cores} cores: threads on busy cores wait "
        "for each other); choose with --threads N or OMP_NUM_THREADS=N"
    )


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


# ---------------------------------------------------------------------------------------------------------
# Checking what a script reads, before any work: each bad input is one KAError naming the flag and the file.
# (--out is checked by files.check_out_dir / check_out_file: earlier results, and a probe that it is writable.)


def flag(name: str) -> str:
    """The flag of an argparse dest: batch_size -> --batch-size."""
    return "--" + name.replace("_", "-")


def check_numbers(args, at_least: dict | None = None, above: dict | None = None) -> None:
    """KAError for a numeric flag out of range: at_least={"batch_size": 1} (value >= 1), above={"lr": 0} (> 0).
    A flag left at None (not given, no default) is not checked; NaN is never in range."""
    for name, minimum in (at_least or {}).items():
        value = getattr(args, name)
        if value is not None and not value >= minimum:
            raise KAError(f"{flag(name)} {value}: give at least {minimum}")
    for name, bound in (above or {}).items():
        value = getattr(args, name)
        if value is not None and not value > bound:
            raise KAError(f"{flag(name)} {value}: give a number above {bound}")


def check_model_flags(args):
    """--model (a loadable model: config and weight headers, ka_hf.preflight), --tokenizer (default: the model's
    folder) and --adapter (when the script has it: its files, and that it was fit for this model), cheaply.
    Returns the model's config, for checks that need its shape (layers, positions) before the weights load."""
    from ka_hf.adapters import check_base, read_adapter_config, read_adapter_weights
    from ka_hf.preflight import check_model_files, check_tokenizer_files

    config = check_model_files(args.model, "--model")
    check_tokenizer_files(args.tokenizer or args.model, "--tokenizer" if args.tokenizer else "--model")
    if getattr(args, "adapter", None):
        adapter = read_adapter_config(args.adapter)
        read_adapter_weights(args.adapter, adapter)  # (an adapter is small: its tensors are read whole)
        check_base(adapter.get("base_model"), config, args.adapter)
    return config


def check_data_flags(args) -> None:
    """--dataset or --text-file, not both; every text-file flag the script has names a readable text file."""
    from .data import check_text_file

    if getattr(args, "dataset", None) and getattr(args, "text_file", None):
        raise KAError("give --dataset or --text-file, not both")
    for name in ("text_file", "val_text_file", "test_text_file"):
        if getattr(args, name, None):
            check_text_file(getattr(args, name), flag(name))


@contextlib.contextmanager
def on_interrupt(say):
    """Ctrl-C inside the block ends the script with one line, `interrupted: ` + say() (where the work so far is,
    and the command that continues it), and exit status 130 (user_errors_exit_2 prints it)."""
    try:
        yield
    except Interrupted:
        raise
    except KeyboardInterrupt:
        raise Interrupted(say()) from None
