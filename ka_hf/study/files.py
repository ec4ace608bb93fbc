"""Writing results safely: the one home for how the study and the scripts write files and folders.

- Nothing is lost: `check_out_dir` refuses a folder that holds earlier results unless the caller was told to
  overwrite (or resume) it; it runs before anything is written or deleted.
- Nothing is half-written: every file is written to a temporary name in the same folder and then moved over the
  old one with `os.replace` (atomic on POSIX and Windows), so a crash leaves the old file or the new one, never a
  mix. A folder (a checkpoint, an adapter) is built complete under a temporary name next to it and then swapped
  in; a crash during the build leaves the old folder as it was.
"""

import contextlib
import json
import os
import shutil
import tempfile
from pathlib import Path

import torch

from ka_hf.errors import KAError

PARTIAL_PREFIX = ".partial-"  # the prefix of temporary names; never a result


def holds_results(folder) -> bool:
    """True when `folder` exists and has anything in it (an empty or missing folder holds nothing to lose)."""
    folder = Path(folder)
    return folder.is_dir() and any(entry for entry in folder.iterdir() if not entry.name.startswith(PARTIAL_PREFIX))


def check_out_dir(folder, overwrite: bool = False, flags: str = "--overwrite", option: str = "--out") -> Path:
    """Refuse (KAError, one line) a `folder` that holds earlier results unless `overwrite`; `flags` names what the
    user can pass instead (e.g. "--resume or --overwrite"), `option` the flag that chose the folder. Deletes
    nothing."""
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise KAError(f"{folder} is a file, not a folder: choose another {option}")
    if holds_results(folder) and not overwrite:
        raise KAError(
            f"{folder} already holds earlier results: pass {flags} to replace them, or choose another {option}"
        )
    return folder


def check_out_file(path, overwrite: bool = False, option: str = "--out") -> Path:
    """Refuse (KAError, one line) a results file that exists already unless `overwrite`. Deletes nothing."""
    path = Path(path)
    if path.is_dir():
        raise KAError(f"{path} is a folder, not a file: choose another {option}")
    if path.exists() and not overwrite:
        raise KAError(f"{path} already exists: pass --overwrite to replace it, or choose another {option}")
    return path


@contextlib.contextmanager
def atomic_path(path):
    """Yield a temporary path in `path`'s folder; on success it replaces `path` (os.replace), on an error it is
    removed and `path` is left as it was."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(prefix=PARTIAL_PREFIX + path.name + ".", dir=path.parent)
    os.close(handle)
    try:
        yield Path(temporary)
        os.replace(temporary, path)
    finally:
        if os.path.exists(temporary):
            os.unlink(temporary)


def write_text(path, text: str) -> Path:
    """Write `text` to `path` atomically."""
    with atomic_path(path) as temporary:
        temporary.write_text(text)
    return Path(path)


def write_json(path, record) -> Path:
    """Write `record` as indented JSON, atomically: serialized in full before anything is written, so a value
    that cannot be serialized leaves the old file untouched. Dataclass records are written with to_dict()."""
    if hasattr(record, "to_dict"):
        record = record.to_dict()
    return write_text(path, json.dumps(record, indent=2, default=_jsonable) + "\n")


def _jsonable(value):
    if isinstance(value, torch.Tensor):
        return value.tolist()
    if isinstance(value, (set, frozenset, tuple)):
        return list(value)
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"not JSON serializable: {type(value).__name__}")


@contextlib.contextmanager
def staged_dir(folder, name: str | None = None):
    """Yield an empty temporary folder next to `folder`; on success it replaces `folder` (the old one, if any, is
    removed only after the new one is complete), on an error it is removed and `folder` is left as it was.

    name: a fixed temporary name (several processes that must agree on the path, e.g. accelerate's save_state);
    default: a unique one.
    """
    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    if name is None:
        staging = Path(tempfile.mkdtemp(prefix=PARTIAL_PREFIX + folder.name + ".", dir=folder.parent))
    else:
        staging = folder.parent / (PARTIAL_PREFIX + name)
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir()
    try:
        yield staging
        replace_dir(staging, folder)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def replace_dir(source, folder) -> None:
    """Move the complete folder `source` to `folder`, replacing it: the old folder is renamed aside first and
    removed after the move, so `folder` is always either the old or the new one (or, for an instant, absent)."""
    source, folder = Path(source), Path(folder)
    old = None
    if folder.exists():
        old = Path(tempfile.mkdtemp(prefix=PARTIAL_PREFIX + folder.name + ".old.", dir=folder.parent))
        os.replace(folder, old / folder.name)
    os.replace(source, folder)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def save_plot(path, draw) -> Path:
    """Create a figure, let `draw(ax)` fill it, save it as PNG (atomically) and close it."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, ax = plt.subplots(figsize=(7, 4.2), dpi=120)
    try:
        draw(ax)
        ax.grid(alpha=0.3)
        figure.tight_layout()
        with atomic_path(path) as temporary:
            figure.savefig(temporary, format="png")
    finally:
        plt.close(figure)
    return Path(path)
