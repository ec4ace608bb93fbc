"""Text -> tokens -> windows: the one place where ka_hf turns text into model inputs.

Three jobs live here:

1. Loading text (`load_texts`): a Hub dataset by name, a local .txt/.jsonl/.json/
   .parquet file (both through the `datasets` library), or the offline default
   corpus.
2. Tokenizing (`train_tokenizer`, `tokenize_texts`): a byte-level BPE tokenizer
   trained from scratch, and one 1-D id stream with eos between texts.
3. Cutting the stream (`ppl_windows`, `count_scored_tokens`, `pad_batch`,
   `lm_blocks`): sliding perplexity windows exactly as in the Hugging Face guide
   "Perplexity of fixed-length models", and contiguous training blocks.

The offline default corpus (`default_corpus`)
----------------------------------------------
A quick study must run with no download at all, so the default corpus is text
that every Python installation already ships: the docstrings of a fixed, sorted
list of standard-library modules and of their public classes, methods and
functions. Why this text:
- offline and always present: read from the stdlib *source files* with `ast`,
  so nothing is imported (no side effects) and `python -OO` does not matter;
- real English prose, written by people, with a technical vocabulary;
- license: the Python Software Foundation License (PSF-2.0), same as Python;
- deterministic for a given Python version (a fixed module list, sorted order,
  splits chosen by a hash of each docstring's source name, not by `hash()`).
Cleaning: dedent, drop doctest examples (`>>>` lines and the output lines that
follow them), pieces shorter than `MIN_DOC_CHARS` and repeated docstrings. The split is ~90/5/5
(train/validation/test). On Python 3.11 this gives roughly 0.5M characters of
train and ~30k characters each of validation and test: enough for a tiny LM,
far smaller than WikiText (use `text_file=`/`dataset=` for real studies).
"""

import ast
import codecs
import functools
import hashlib
import os
import sysconfig
from pathlib import Path

import torch

from ka_hf.errors import KAError

EOS_TOKEN = "<|endoftext|>"
SPLITS = ("train", "validation", "test")
LOCAL_BUILDERS = {".txt": "text", ".jsonl": "json", ".json": "json", ".parquet": "parquet"}

# -----------------------------------------------------------------------------
# loading text


def shared_data_dir() -> Path:
    """Where corpora beside a source checkout live: $KA_HF_DATA, else ../shared/data next to the repository
    (may not exist: callers check the file they need and fall back to the Hub)."""
    if os.environ.get("KA_HF_DATA"):
        return Path(os.environ["KA_HF_DATA"])
    return Path(__file__).resolve().parents[3] / "shared" / "data"


def load_texts(dataset=None, dataset_config=None, split="test", text_file=None, text_column="text"):
    """Return the non-empty texts of a Hub dataset, a local file, or the default corpus.

    dataset:    a Hub dataset name, loaded with `load_dataset(dataset, dataset_config, split=split)`.
    text_file:  a local file; the builder follows the extension (.txt: one text per line,
                .jsonl/.json, .parquet: the `text_column` column). The whole file is one
                split, so `split` is ignored for local files.
    neither:    `default_corpus(split)`, the offline corpus described in this module's docstring.
    """
    if dataset is not None and text_file is not None:
        raise KAError("give either dataset= (a Hub dataset) or text_file= (a local file), not both")
    if text_file is not None:
        rows, source = _load_local_file(Path(text_file), text_column), str(text_file)
    elif dataset is not None:
        rows, source = _load_hub_dataset(dataset, dataset_config, split, text_column), f"{dataset} [{split}]"
    else:
        rows, source = default_corpus(split), f"the default corpus [{split}]"
    texts = [text for text in rows if text is not None and text.strip()]
    if not texts:
        raise KAError(f"no text in {source}: give a file or dataset with non-empty '{text_column}' entries")
    return texts


def load_train_val_texts(
    dataset=None,
    dataset_config=None,
    text_file=None,
    val_text_file=None,
    split="train",
    val_split="validation",
    text_column="text",
):
    """(training texts, validation texts or None, where they came from): the one loader of a training run's text.

    A text file: its texts, and --val-text-file's (None without one: the caller splits off its own validation
    part). A Hub dataset or the default corpus: its `split` and `val_split`.
    """
    if text_file is not None:
        train_texts = load_texts(text_file=text_file, text_column=text_column)
        val_texts = None if val_text_file is None else load_texts(text_file=val_text_file, text_column=text_column)
        return train_texts, val_texts, str(text_file) + (f" (validation: {val_text_file})" if val_text_file else "")
    train_texts = load_texts(dataset, dataset_config, split, text_column=text_column)
    val_texts = load_texts(dataset, dataset_config, val_split, text_column=text_column)
    name = f"{dataset} ({dataset_config})" if dataset and dataset_config else dataset or "the offline default corpus"
    return train_texts, val_texts, f"{name} [{split} / {val_split}]"


def check_text_file(path, what: str = "text file") -> str:
    """The `datasets` builder for a local text file, or KAError (one line) when it cannot be read: missing, a
    folder, an unknown type, empty, unreadable, or (.txt/.json/.jsonl) not UTF-8 in its first 64 KiB. Cheap: the
    scripts call it for every text-file flag before any work."""
    path = Path(path)
    if path.is_dir():
        raise KAError(f"{what} {path} is a folder, not a file: give a {', '.join(LOCAL_BUILDERS)} file")
    if not path.is_file():
        raise KAError(f"{what} not found: {path} (check the path; it is read relative to the current directory)")
    builder = LOCAL_BUILDERS.get(path.suffix.lower())
    if builder is None:
        raise KAError(f"unknown text file type '{path.suffix}' for {path}: use one of {', '.join(LOCAL_BUILDERS)}")
    if path.stat().st_size == 0:
        raise KAError(f"no text in {path}: the file is empty")  # `datasets` fails obscurely on empty files
    try:
        with path.open("rb") as file:
            head = file.read(1 << 16)
    except OSError as error:
        raise KAError(f"cannot read {what} {path}: {error.strerror}") from None
    if builder != "parquet":
        try:
            codecs.getincrementaldecoder("utf-8")().decode(head)  # (a character cut at the end is not an error)
        except UnicodeDecodeError as error:
            raise KAError(f"cannot decode {path} as UTF-8 (byte {error.start}): re-save it as UTF-8 text") from None
    if builder == "text" and len(head) == path.stat().st_size and not head.strip():
        raise KAError(f"no text in {path}: the file holds only white space")
    return builder


def _load_local_file(path, text_column):
    from datasets import load_dataset  # imported lazily: `datasets` is slow to import

    builder = check_text_file(path)
    try:
        ds = load_dataset(builder, data_files=str(path), split="train")
    except Exception as err:  # `datasets` wraps decode errors in its own exception types
        if _caused_by(err, UnicodeDecodeError):
            raise KAError(f"cannot decode {path} as UTF-8: re-save it as UTF-8 text") from err
        raise KAError(f"cannot read {path} as {builder} data: {err}") from err
    return _column(ds, text_column, str(path))


def _load_hub_dataset(name, config, split, text_column):
    from datasets import load_dataset

    try:
        ds = load_dataset(name, config, split=split)
    except (OSError, ValueError) as err:  # offline/not found (ConnectionError, FileNotFoundError), bad split
        raise KAError(
            f"cannot load dataset '{name}' (config {config!r}, split {split!r}): {err}. "
            "Offline? Pass text_file= with a local file, or neither to use the default corpus."
        ) from err
    return _column(ds, text_column, name)


def _column(ds, text_column, source):
    if text_column not in ds.column_names:
        raise KAError(f"no column '{text_column}' in {source}: set text_column to one of {ds.column_names}")
    return ds[text_column]


def _caused_by(err, error_type):
    """True if `err` or any exception in its cause/context chain is an `error_type`."""
    seen = set()
    while err is not None and id(err) not in seen:
        if isinstance(err, error_type):
            return True
        seen.add(id(err))
        err = err.__cause__ or err.__context__
    return False


# -----------------------------------------------------------------------------
# the offline default corpus

# Fixed and sorted so the corpus only changes when Python's own docstrings do.
DEFAULT_CORPUS_MODULES = tuple(
    sorted(
        """
    argparse asyncio.events asyncio.streams asyncio.tasks base64 bisect calendar codecs
    collections configparser contextlib copy csv dataclasses datetime decimal difflib
    doctest email.message enum fnmatch fractions ftplib functools getopt gettext glob
    gzip hashlib heapq hmac html.parser http.client http.server imaplib inspect
    ipaddress json locale logging logging.handlers mailbox mimetypes multiprocessing.pool
    numbers optparse os pathlib pdb pickle platform pprint pydoc queue random re sched
    secrets selectors shlex shutil signal smtplib socket socketserver sqlite3 ssl
    statistics string subprocess sysconfig tarfile tempfile textwrap threading timeit
    tokenize trace traceback tracemalloc turtle typing unittest.case unittest.mock
    urllib.parse urllib.request uuid warnings wave weakref xml.dom.minidom
    xml.etree.ElementTree zipapp zipfile
""".split()
    )
)
MIN_DOC_CHARS = 80  # shorter docstrings are mostly one-line labels ("Return self.")
DEFINITION_NODES = (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)


def default_corpus(split):
    """The offline default corpus for `split` ("train", "validation" or "test"): a list of texts.

    Stdlib docstrings, cleaned; see this module's docstring for why and how.
    """
    if split not in SPLITS:
        raise KAError(f"unknown split '{split}' for the default corpus: use one of {SPLITS}")
    return list(_default_corpus_splits()[split])  # a copy: callers may mutate their list


@functools.lru_cache(maxsize=1)
def _default_corpus_splits():
    splits, seen = {name: [] for name in SPLITS}, set()
    for source_name, text in _stdlib_docstrings():
        if text in seen:
            continue  # a docstring copied between classes must not land in two splits
        seen.add(text)
        splits[_split_of(source_name)].append(text)
    if not splits["train"]:
        raise KAError("this Python installation ships no stdlib sources: pass text_file= or dataset=")
    return {name: tuple(texts) for name, texts in splits.items()}


def _split_of(source_name):
    # sha256, not hash(): the split must not depend on PYTHONHASHSEED
    bucket = int(hashlib.sha256(source_name.encode()).hexdigest(), 16) % 100
    return "train" if bucket < 90 else "validation" if bucket < 95 else "test"


def _stdlib_docstrings():
    """Yield (qualified name, cleaned docstring) for each module, public class/function/method."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    for module in DEFAULT_CORPUS_MODULES:
        path = _module_source(stdlib, module)
        if path is None:
            continue  # e.g. a stripped-down install: use what is there
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for name, node in _documented_nodes(module, tree):
            text = _clean_docstring(ast.get_docstring(node, clean=True) or "")
            if len(text) >= MIN_DOC_CHARS:
                yield name, text


def _module_source(stdlib, module):
    relative = Path(*module.split("."))
    for path in (stdlib / relative.with_suffix(".py"), stdlib / relative / "__init__.py"):
        if path.is_file():
            return path
    return None


def _documented_nodes(module, tree):
    yield module, tree
    for node in tree.body:
        if isinstance(node, DEFINITION_NODES) and not node.name.startswith("_"):
            yield f"{module}.{node.name}", node
            if isinstance(node, ast.ClassDef):
                for member in node.body:
                    if isinstance(member, DEFINITION_NODES) and not member.name.startswith("_"):
                        yield f"{module}.{node.name}.{member.name}", member


def _clean_docstring(doc):
    """Drop doctest examples: each `>>>`/`...` line and the output lines up to the next blank line."""
    kept, in_example = [], False
    for line in doc.splitlines():
        stripped = line.strip()
        if stripped.startswith(">>>"):
            in_example = True
        elif not stripped:
            in_example = False
        if not in_example:
            kept.append(line.rstrip())
    return "\n".join(kept).strip()


# -----------------------------------------------------------------------------
# tokenizing


def train_tokenizer(texts, vocab_size=8192, min_frequency=2):
    """Train a byte-level BPE tokenizer (GPT-2 style) on `texts`.

    `<|endoftext|>` is the only special token and serves as bos, eos, unk and pad
    (pad so that batching works; byte-level BPE never needs unk). The result saves
    with `save_pretrained` and reloads with `AutoTokenizer.from_pretrained`.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    texts = [text for text in texts if text]
    if not texts:
        raise KAError("cannot train a tokenizer on no text: pass a non-empty list of texts")
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=[EOS_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # all 256 bytes: any text encodes
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token=EOS_TOKEN,
        eos_token=EOS_TOKEN,
        unk_token=EOS_TOKEN,
        pad_token=EOS_TOKEN,
        model_max_length=1_000_000_000,  # windows are cut by ppl_windows/lm_blocks, not here
    )


def tokenize_texts(texts, tokenizer):
    """Encode every text (no special tokens) and join them into one 1-D LongTensor, eos between texts."""
    eos_id = tokenizer.eos_token_id
    if eos_id is None:
        raise KAError("the tokenizer has no eos token: set tokenizer.eos_token before tokenizing")
    encoded = tokenizer(list(texts), add_special_tokens=False)["input_ids"]
    ids = []
    for i, text_ids in enumerate(encoded):
        if i > 0:
            ids.append(eos_id)
        ids.extend(text_ids)
    return torch.tensor(ids, dtype=torch.long)


# -----------------------------------------------------------------------------
# perplexity windows and training blocks


def ppl_windows(ids, max_length, stride):
    """Sliding windows over the 1-D token stream `ids`, as in the HF guide "Perplexity of fixed-length models".

    Windows begin every `stride` tokens; a window holds the tokens [begin, end) with
    end = min(begin + max_length, len(ids)). Its labels are its input_ids with the tokens
    already scored by the previous window (the first (end - begin) - (end - prev_end)
    positions) set to -100. The loop stops after the window that reaches the end.
    See `count_scored_tokens` for which tokens a model actually scores.
    Returns a list of dicts: input_ids, labels (1-D LongTensors), begin, end.
    """
    ids = torch.as_tensor(ids, dtype=torch.long).reshape(-1)
    if stride < 1 or stride > max_length:
        raise KAError(f"need 1 <= stride <= max_length, got stride={stride}, max_length={max_length}")
    if max_length < 2:
        raise KAError(f"max_length must be at least 2 to score anything, got {max_length}")
    if len(ids) < 2:
        raise KAError(f"need at least 2 tokens to measure perplexity, got {len(ids)}: give more text")
    windows, prev_end = [], 0
    for begin in range(0, len(ids), stride):
        end = min(begin + max_length, len(ids))
        target_len = end - prev_end  # tokens not scored by an earlier window
        input_ids = ids[begin:end].clone()
        labels = input_ids.clone()
        labels[: len(input_ids) - target_len] = -100
        windows.append({"input_ids": input_ids, "labels": labels, "begin": begin, "end": end})
        prev_end = end
        if end == len(ids):
            break
    return windows


def count_scored_tokens(windows):
    """Number of tokens the model actually scores over `windows` (HF label convention).

    HF causal LMs shift labels inside the model: logits at position t predict labels[t + 1],
    so label position 0 of a window is never scored. The scored tokens are therefore the
    positions 1.. of each window whose label is not -100: `(labels[1:] != -100).sum()`.
    With stride < max_length that is every token of the stream except the very first one;
    with stride == max_length the first token of every window is not scored (as in the
    guide), and a trailing 1-token window scores nothing (skip it when averaging).
    """
    return sum(int((window["labels"][1:] != -100).sum()) for window in windows)


def pad_batch(windows, pad_id):
    """Right-pad `windows` into (input_ids, attention_mask, labels), each [batch, longest]; labels -100 on pads."""
    if not windows:
        raise KAError("cannot batch zero windows")
    longest = max(len(window["input_ids"]) for window in windows)
    input_ids = torch.full((len(windows), longest), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(windows), longest), dtype=torch.long)
    labels = torch.full((len(windows), longest), -100, dtype=torch.long)
    for row, window in enumerate(windows):
        n = len(window["input_ids"])
        input_ids[row, :n] = window["input_ids"]
        attention_mask[row, :n] = 1
        labels[row, :n] = window["labels"]
    return input_ids, attention_mask, labels


def lm_blocks(ids, block_size, max_blocks=None):
    """Cut `ids` into contiguous, non-overlapping training blocks: a LongTensor [n_blocks, block_size].

    The tail shorter than a block is dropped. The original study used 5,000 blocks of 128 tokens.
    """
    ids = torch.as_tensor(ids, dtype=torch.long).reshape(-1)
    if block_size < 2:
        raise KAError(f"block_size must be at least 2, got {block_size}")
    n_blocks = len(ids) // block_size
    if max_blocks is not None:
        n_blocks = min(n_blocks, max_blocks)
    if n_blocks < 1:
        raise KAError(
            f"{len(ids)} tokens are fewer than one block of {block_size}: give more text or a smaller block_size"
        )
    return ids[: n_blocks * block_size].reshape(n_blocks, block_size).clone()
