"""Checks run before any work: is this a model that loads, can this folder be written? One KAError each, naming
the file and what to do, so that a bad input costs seconds, not a run.

`check_model_files(path_or_id)` reads a local model folder's config.json (through `AutoConfig`, so an unknown
model_type is named too) and only the *headers* of its weight files: a safetensors file's header names the byte
range of every tensor, so a truncated or damaged file is found from its size, in microseconds, without reading
the weights. A Hub id gets its config read (from the cache when offline). The scripts call it while checking
their flags, and `from_pretrained`'s own errors (a `SafetensorError`, an `UnpicklingError` that advises unsafe
loading) never reach the user for these cases.

`check_writable(folder)` creates and removes a file where the results will go: mode bits do not tell (root
ignores them, while a read-only mount, an immutable folder or /proc stop even root).
"""

import json
import os
import struct
import tempfile
import zipfile
from pathlib import Path

from .errors import KAError

SAFETENSORS = "model.safetensors"
PYTORCH_BIN = "pytorch_model.bin"
WEIGHT_FILES = (SAFETENSORS, SAFETENSORS + ".index.json", PYTORCH_BIN, PYTORCH_BIN + ".index.json")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "tokenizer.model", "spiece.model")
SAVED_HOW = "a save_pretrained folder (config.json + model.safetensors)"


def looks_local(path_or_id) -> bool:
    """A name that can only be a local path: starts with `.`, `/` or `~`, has more than one `/` (a Hub id has
    one), has the OS separator, or whose first part exists here (`runs/typo` when `runs/` exists)."""
    name = str(path_or_id)
    if name.startswith((".", "/", "~")) or name.count("/") > 1 or (os.sep != "/" and os.sep in name):
        return True
    return "/" in name and os.path.exists(name.split("/", 1)[0])


def check_local_path(path_or_id, what: str = "model path") -> None:
    """A local-looking name that does not exist is a typo, not a Hub id: say so at once, without the network."""
    if looks_local(path_or_id) and not os.path.exists(os.path.expanduser(str(path_or_id))):
        raise KAError(f"{what} {str(path_or_id)!r} does not exist (no such local directory)")


def check_model_files(path_or_id, what: str = "model"):
    """The model's config (a transformers PretrainedConfig), or KAError (one line) when `path_or_id` is not a
    model that loads: a missing path, a file, a folder without config.json or weights, a config.json that is not
    JSON or names no known model_type, a weight file that is truncated or damaged, a Hub id that is not there.
    `what` names the flag in the message (e.g. "--model", "pretrained=")."""
    check_local_path(path_or_id, what)
    folder = Path(os.path.expanduser(str(path_or_id)))
    if folder.is_file():
        raise KAError(f"{what} {folder} is a file, not a model folder: give {SAVED_HOW}")
    if not folder.is_dir():  # a Hub id: its config is all that can be checked without downloading the weights
        return _read_config(str(path_or_id), what)
    if not (folder / "config.json").is_file():
        nested = [child.name for child in sorted(folder.iterdir()) if (child / "config.json").is_file()]
        hint = f" (the model may be in {folder / nested[0]})" if nested else ""
        raise KAError(f"{what} {folder} has no config.json: it is not {SAVED_HOW}{hint}")
    read_json_file(folder / "config.json")
    config = _read_config(str(folder), what)
    weights = [folder / name for name in WEIGHT_FILES if (folder / name).is_file()]
    if not weights:
        raise KAError(f"{what} {folder} has no weights ({' or '.join(WEIGHT_FILES[::2])}): it is not {SAVED_HOW}")
    check_weight_file(weights[0])
    return config


def check_tokenizer_files(path_or_id, what: str = "--tokenizer") -> None:
    """KAError when a local folder holds no tokenizer (a Hub id is left to AutoTokenizer)."""
    check_local_path(path_or_id, what)
    folder = Path(os.path.expanduser(str(path_or_id)))
    if folder.is_file():
        raise KAError(f"{what} {folder} is a file, not a tokenizer folder (save_pretrained writes one)")
    if folder.is_dir() and not any((folder / name).is_file() for name in TOKENIZER_FILES):
        raise KAError(f"{folder} holds no tokenizer ({', '.join(TOKENIZER_FILES[:2])}): give --tokenizer PATH_OR_ID")


def check_weight_file(path) -> None:
    """KAError naming `path` when a weight file (or a shard index and its shards) cannot be what it says."""
    path = Path(path)
    if path.name.endswith(".index.json"):
        index = read_json_file(path)
        shards = sorted(set((index.get("weight_map") or {}).values())) if isinstance(index, dict) else []
        if not shards:
            raise KAError(f"{path} names no weight files (no weight_map): the model folder is damaged")
        for shard in shards:
            if not (path.parent / shard).is_file():
                raise KAError(f"{path.parent / shard} is missing (named by {path.name}): copy the whole model folder")
            check_weight_file(path.parent / shard)
    elif path.suffix == ".safetensors":
        _check_safetensors(path)
    elif not (zipfile.is_zipfile(path) or _starts_with(path, b"\x80")):  # torch.save: a zip (or an old pickle)
        raise KAError(f"{path} is not a readable PyTorch weights file (truncated or damaged): save the model again")


def _check_safetensors(path: Path) -> None:
    """The header (an 8-byte length, then JSON) must parse, and the tensors' byte ranges must cover the rest of
    the file exactly, as safetensors itself requires."""
    size = path.stat().st_size
    damaged = f"{path} is truncated or damaged"
    with path.open("rb") as file:
        head = file.read(8)
        if len(head) < 8:
            raise KAError(f"{damaged} ({size} bytes, no header): copy or save the model again")
        (header_size,) = struct.unpack("<Q", head)
        if header_size > size - 8:
            raise KAError(
                f"{damaged} (its header alone needs {header_size:,} bytes of {size:,}): copy or save it again"
            )
        try:
            header = json.loads(file.read(header_size))
        except (UnicodeDecodeError, ValueError):
            header = None
    if not isinstance(header, dict):
        raise KAError(f"{damaged} (its header is not readable): copy or save the model again")
    ends = [entry["data_offsets"][1] for name, entry in header.items() if name != "__metadata__"]
    needed = 8 + header_size + max(ends, default=0)
    if needed != size:
        raise KAError(f"{damaged}: it holds {size:,} bytes, its header names {needed:,}: copy or save it again")


def read_json_file(path, what: str = "") -> object:
    """The JSON in `path`, or KAError naming the file (and the flag `what` that gave it): missing, not UTF-8, not
    JSON."""
    path, named = Path(path), f"{what} {path}".strip()
    if not path.is_file():
        raise KAError(f"{named} is not a file: check the path")
    try:
        return json.loads(path.read_text())
    except UnicodeDecodeError:
        raise KAError(f"{named} is not UTF-8 JSON: the file is damaged") from None
    except json.JSONDecodeError as error:
        raise KAError(f"{named} is not valid JSON ({error.msg}, line {error.lineno}): the file is damaged") from None


def _read_config(path_or_id: str, what: str):
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(path_or_id)
    except (OSError, ValueError, KeyError) as error:  # not found / offline, unknown or missing model_type
        reason = " ".join(str(error).split())
        raise KAError(f"{what} {path_or_id}: cannot read its config ({reason[:300]})") from None


def _starts_with(path: Path, prefix: bytes) -> bool:
    with path.open("rb") as file:
        return file.read(len(prefix)) == prefix


def check_writable(folder, option: str = "--out", chosen=None) -> None:
    """KAError (one line) unless a file can be made in `folder`, or, when it does not exist yet, in the nearest
    folder above it (where it will be made): probed by creating and removing a file. `option` names the flag;
    `chosen`: the path the user gave, when it is not `folder` itself (a results file in it), for the message."""
    folder = Path(folder)
    chosen = folder if chosen is None else chosen
    existing = folder
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise KAError(f"{option} {chosen} cannot be made: {existing} is a file, not a folder: choose another {option}")
    try:
        handle, probe = tempfile.mkstemp(prefix=".partial-probe.", dir=existing)  # (files.PARTIAL_PREFIX)
        os.close(handle)
        os.unlink(probe)
    except OSError as error:
        reason = error.strerror or type(error).__name__
        raise KAError(
            f"{option} {chosen} is not writable (creating a file in {existing} fails: {reason}): "
            f"choose another {option}"
        ) from None
