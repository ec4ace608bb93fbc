"""Writing results safely: the one home for how the study and the scripts write files and folders.

- Nothing is lost: `check_out_dir` refuses a folder that holds earlier results unless the caller was told to
  overwrite (or resume) it, and one that cannot be written to (it creates and removes a file there: mode bits do
  not tell, since root ignores them); it runs before anything is written, deleted or computed. `write_results`
  puts a run's results somewhere even when their folder fails at the end (a full disk, a folder made read-only
  during the run): next to it, else in the temporary folder, and says where.
- Nothing is half-written: every file is written to a temporary name in the same folder and then moved over the
  old one with `os.replace` (atomic on POSIX and Windows), so a crash leaves the old file or the new one, never a
  mix. A folder (a checkpoint, an adapter) is built complete under a temporary name next to it and then swapped
  in; a crash during the build leaves the old folder as it was.
- Files and folders get the modes `open()` and `mkdir()` would give them (the umask's), not a temporary file's
  0600: a shared group can read a run.
"""

import contextlib
import json
import os
import secrets
import shutil
import stat
import tempfile
from pathlib import Path

import torch

from ka_hf.errors import KAError
from ka_hf.preflight import check_writable

PARTIAL_PREFIX = ".partial-"  # the prefix of temporary names; never a result


def holds_results(folder) -> bool:
    """True when `folder` exists and has anything in it (an empty or missing folder holds nothing to lose)."""
    folder = Path(folder)
    return folder.is_dir() and any(entry for entry in folder.iterdir() if not entry.name.startswith(PARTIAL_PREFIX))


def check_out_dir(folder, overwrite: bool = False, flags: str = "--overwrite", option: str = "--out") -> Path:
    """Refuse (KAError, one line) a `folder` that holds earlier results unless `overwrite`; `flags` names what the
    user can pass instead (e.g. "--resume or --overwrite"), `option` the flag that chose the folder. Refuses one
    that cannot be written too (preflight.check_writable: a file is made and removed there). Deletes nothing."""
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise KAError(f"{folder} is a file, not a folder: choose another {option}")
    if holds_results(folder) and not overwrite:
        raise KAError(
            f"{folder} already holds earlier results: pass {flags} to replace them, or choose another {option}"
        )
    check_writable(folder, option)
    return folder


def check_out_file(path, overwrite: bool = False, option: str = "--out") -> Path:
    """Refuse (KAError, one line) a results file that exists already unless `overwrite`, or whose folder cannot be
    written. Deletes nothing."""
    path = Path(path)
    if path.is_dir():
        raise KAError(f"{path} is a folder, not a file: choose another {option}")
    if path.exists() and not overwrite:
        raise KAError(f"{path} already exists: pass --overwrite to replace it, or choose another {option}")
    check_writable(path.parent, option, chosen=path)
    return path


def write_results(out, write, option: str = "--out", file: bool = False):
    """`write(out)` puts a run's results in the folder `out` (or, with file=True, the file `out`) and returns
    what the caller wants back; when it fails with an OSError (a full disk, a folder made read-only or removed
    during the run), it is run again on a new folder (file) next to `out`, else in the temporary folder, and the
    KAError names it: the scores of a long run are never lost to its last step."""
    out = Path(out)
    try:
        return write(out)
    except OSError as error:
        failed = f"cannot write the results to {option} {out} ({_reason(error)})"
    for parent in (out.parent, Path(tempfile.gettempdir())):
        try:
            if file:
                rescue = _new_path(parent, f"{out.stem}-unsaved-", _make_file, suffix=out.suffix)
            else:
                rescue = _new_path(parent, f"{out.name}-unsaved-", os.mkdir)
        except OSError:
            continue
        try:
            write(rescue)
        except OSError:
            (os.unlink if file else shutil.rmtree)(rescue)
            continue
        raise KAError(f"{failed}: they are saved in {rescue} instead")
    raise KAError(f"{failed}, nor next to it or in {tempfile.gettempdir()}: free some space and run again")


def _reason(error: OSError) -> str:
    return error.strerror or str(error) or type(error).__name__


def _make_file(path) -> None:
    os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))  # the umask applies, as with open()


def _new_path(parent: Path, prefix: str, make, suffix: str = "") -> Path:
    """A new file or folder (`make(path)`: _make_file or os.mkdir) with a unique name in `parent`. Unlike
    tempfile's, its mode is the umask's (tempfile makes 0600 files and 0700 folders)."""
    for _ in range(100):
        path = Path(parent) / f"{prefix}{secrets.token_hex(4)}{suffix}"
        try:
            make(path)
            return path
        except FileExistsError:
            continue
    raise FileExistsError(f"no free temporary name in {parent}")


@contextlib.contextmanager
def atomic_path(path):
    """Yield a temporary path in `path`'s folder; on success it replaces `path` (os.replace), on an error it is
    removed and `path` is left as it was."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = _new_path(path.parent, PARTIAL_PREFIX + path.name + ".", _make_file)
    try:
        yield temporary
        with contextlib.suppress(FileNotFoundError):  # replacing a file keeps its mode, as open(path, "w") would
            os.chmod(temporary, stat.S_IMODE(path.stat().st_mode))
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
        staging = _new_path(folder.parent, PARTIAL_PREFIX + folder.name + ".", os.mkdir)
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
    if folder.exists() and not folder.is_dir():  # a file is never replaced by a folder (never deleted)
        raise FileExistsError(17, "a file is in the way", str(folder))
    old = None
    if folder.exists():
        old = Path(tempfile.mkdtemp(prefix=PARTIAL_PREFIX + folder.name + ".old.", dir=folder.parent))
        os.replace(folder, old / folder.name)
        try:
            os.replace(source, folder)
        except BaseException:  # (Ctrl-C too) the old folder goes back: never neither
            os.replace(old / folder.name, folder)
            os.rmdir(old)
            raise
    else:
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
