"""File I/O helpers: every final output of legion is written through here.

Atomic writes. A file appears whole or not at all: the data goes to a temporary file in the
target's folder (``.<name>.tmp-<pid>-<random>``: hidden, unique per call; `atomic_path` uses a
folder of that name holding ``<name>``), is flushed and fsynced, then ``os.replace``-d onto the
target. If anything fails on the way (an OSError, a writer's own exception, Ctrl-C) the
temporary file is removed, the previous target (if any) is left untouched, and the exception
propagates unchanged. Parent folders are created. Only a process killed outright (SIGKILL, power
loss) can leave a temporary file behind; it never has the target's name.

    atomic_write_bytes(path, data)
    atomic_write_text(path, text)                          # UTF-8
    atomic_write_json(path, obj, indent=2)                 # json.dumps(...) + "\\n"
    atomic_write_jsonl(path, records)                      # one json.dumps(record) + "\\n" per record
    atomic_write_png(path, array)                          # uint8 [H, W] or [H, W, 3] -> PNG
    with atomic_path(path) as tmp:                         # for writers that want a file name:
        save_file(state, str(tmp))                         # safetensors, torch.save, PIL, savefig, ...
    with atomic_dir(path) as tmp:                          # for outputs that are a whole folder (a model):
        save_model(model, tokenizer, tmp)                  # the folder appears whole, or the old one stays

Text that is not UTF-8. File names that are not valid UTF-8 reach Python as ``os.fsdecode`` strings
with lone surrogates ("\\udcff" for the byte 0xff), which no UTF-8 encoder accepts. The JSON writers
(`atomic_write_json`, `atomic_write_jsonl`, `append_jsonl`) then write that record with ``\\udcXX``
escapes (``ensure_ascii``), valid JSON that ``json.loads`` reads back to the same string, so the name
still opens the same file.

JSON Lines. ``read_jsonl`` returns the records of a file as dicts and, by default, refuses a
line that is not a JSON object (a ``ValueError`` naming ``path:lineno``). ``append_jsonl`` adds
one record durably (flush + fsync), for outputs that grow record by record and are resumed
after a crash: there a crash mid-append can leave a torn last line; the next append ends it with
a newline first, so the torn fragment becomes a line of its own (anywhere in the file after a
resume), and readers of such files pass ``skip_invalid=True`` to drop it with a warning.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import warnings
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from legion.errors import DataError

if TYPE_CHECKING:
    import numpy as np

__all__ = [
    "append_jsonl",
    "atomic_dir",
    "atomic_path",
    "atomic_write_bytes",
    "atomic_write_json",
    "atomic_write_jsonl",
    "atomic_write_png",
    "atomic_write_text",
    "read_jsonl",
    "temp_path_for",
]


# --- atomic writes ---------------------------------------------------------------------------------
def temp_path_for(path: str | os.PathLike) -> Path:
    """A fresh temporary name next to `path`: ``.<name>.tmp-<pid>-<8 hex>``.

    Hidden (image listings and most globs skip it) and unique per call (several processes may
    write the same target, e.g. a shared cache)."""
    path = Path(path)
    return path.with_name(f".{path.name}.tmp-{os.getpid()}-{secrets.token_hex(4)}")


def _fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """For writers that take a file name: yields a temporary path to write to; when the block
    ends normally the file is fsynced and renamed onto `path`.

        with atomic_path(out / "head.safetensors") as tmp:
            save_file(state, str(tmp))

    The temporary path is ``<folder>/.<name>.tmp-<pid>-<random>/<name>``: a private folder next to
    the target holding a file with the target's own name, because some writers use the name:
    PIL and matplotlib pick the format from the suffix, torch.save names its zip archive after the
    file. When the block raises, the temporary folder is removed and `path` is left as it was. A
    block that writes nothing raises FileNotFoundError at the rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    folder = temp_path_for(path)
    folder.mkdir()
    try:
        tmp = folder / path.name
        yield tmp
        _fsync_file(tmp)
        os.replace(tmp, path)
    finally:
        shutil.rmtree(folder, ignore_errors=True)


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike) -> Iterator[Path]:
    """For outputs that are a whole folder (a model directory): yields a new, empty temporary folder next
    to `path` (``.<name>.tmp-<pid>-<random>``); when the block ends normally its files are fsynced and the
    folder is renamed to `path`. An existing `path` is renamed aside first (``.<name>.old-<pid>-<random>``)
    and deleted once the new folder is in place, so `path` names the whole old folder or the whole new one,
    never a mix; only a process killed in the instant between those two renames leaves the old folder
    under its ``.old`` name. When the block raises, the temporary folder is removed and `path` is left as
    it was. Callers decide whether an existing `path` may be replaced (legion.model.export.writing_model_dir)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    folder = temp_path_for(path)
    folder.mkdir()
    try:
        yield folder
        for file in folder.rglob("*"):
            if file.is_file() and not file.is_symlink():
                _fsync_file(file)
        if path.exists() or path.is_symlink():
            old = path.with_name(f".{path.name}.old-{os.getpid()}-{secrets.token_hex(4)}")
            os.rename(path, old)
            try:
                os.rename(folder, path)
            except BaseException:
                os.rename(old, path)
                raise
            if old.is_dir() and not old.is_symlink():
                shutil.rmtree(old, ignore_errors=True)
            else:
                old.unlink(missing_ok=True)
        else:
            os.rename(folder, path)
    finally:
        shutil.rmtree(folder, ignore_errors=True)  # gone already after the rename


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write `data` to `path` atomically (temp file + fsync + rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_path_for(path)
    try:
        with open(tmp, "xb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise


def atomic_write_text(path: str | os.PathLike, text: str, encoding: str = "utf-8") -> None:
    """Write `text` to `path` atomically; no newline translation (the bytes are `text.encode(encoding)`)."""
    atomic_write_bytes(path, text.encode(encoding))


def atomic_write_json(
    path: str | os.PathLike,
    obj: Any,
    indent: int | None = 2,
    *,
    ensure_ascii: bool = True,
    sort_keys: bool = False,
    default: Callable[[Any], Any] | None = None,
) -> None:
    """Write ``json.dumps(obj, indent=..., ...) + "\\n"`` to `path` atomically (UTF-8).

    The object is serialised before any file is touched, so an unserialisable value leaves `path`
    as it was. (Files that have no trailing newline go through `atomic_write_text(path, json.dumps(...))`.)"""
    text = _dumps(obj, ensure_ascii=ensure_ascii, indent=indent, sort_keys=sort_keys, default=default)
    atomic_write_text(path, text + "\n")


def atomic_write_png(path: str | os.PathLike, array: np.ndarray, mode: str | None = None) -> None:
    """Write `array` as a PNG to `path` atomically: `PIL.Image.fromarray(array, mode)` (mode None: the one
    the array implies, e.g. L for uint8 [H, W], RGB for uint8 [H, W, 3]) with Pillow's default PNG settings."""
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(array, mode=mode).save(buf, format="PNG")
    atomic_write_bytes(path, buf.getvalue())


def atomic_write_jsonl(
    path: str | os.PathLike,
    records: Iterable[Any],
    *,
    ensure_ascii: bool = True,
    default: Callable[[Any], Any] | None = None,
) -> None:
    """Write one ``json.dumps(record)`` line per record (each ending in "\\n") to `path` atomically."""
    text = "".join(_dumps(r, ensure_ascii=ensure_ascii, default=default) + "\n" for r in records)
    atomic_write_text(path, text)


def _dumps(obj: Any, *, ensure_ascii: bool, **kwargs: Any) -> str:
    """json.dumps; with ensure_ascii=False, text that cannot be UTF-8 (lone surrogates of a file name that is
    not UTF-8) is written as \\u escapes instead (module docstring)."""
    text = json.dumps(obj, ensure_ascii=ensure_ascii, **kwargs)
    if not ensure_ascii:
        try:
            text.encode("utf-8")
        except UnicodeEncodeError:
            text = json.dumps(obj, ensure_ascii=True, **kwargs)
    return text


# --- JSON Lines ------------------------------------------------------------------------------------
def read_jsonl(path: str | os.PathLike, *, require: Sequence[str] = (), skip_invalid: bool = False) -> list[dict]:
    """The records (dicts) of a JSON Lines file (UTF-8, lines split on "\\n" only).

    Blank lines are skipped. A line that is not UTF-8, not JSON, not a JSON object, or lacks one
    of the `require`d fields raises DataError (a ValueError) "path:lineno: ..." -- unless `skip_invalid`, for
    files grown with `append_jsonl` that a crash may have torn: then such lines are dropped and one
    warning names them. A missing file raises FileNotFoundError either way."""
    path = Path(path)
    records: list[dict] = []
    skipped: list[int] = []
    with open(path, "rb") as fh:
        for lineno, raw in enumerate(fh, 1):
            if not raw.strip():
                continue
            try:
                record = json.loads(raw.decode("utf-8"))
            except UnicodeDecodeError as exc:
                problem = f"not UTF-8 ({exc})"
            except json.JSONDecodeError as exc:
                problem = f"not JSON ({exc})"
            else:
                if not isinstance(record, dict):
                    problem = f"not a JSON object (a {type(record).__name__})"
                elif missing := [name for name in require if name not in record]:
                    problem = "record lacks field(s) " + ", ".join(repr(name) for name in missing)
                else:
                    records.append(record)
                    continue
            if not skip_invalid:
                raise DataError(f"{path}:{lineno}: {problem}")
            skipped.append(lineno)
    if skipped:
        shown = ", ".join(str(n) for n in skipped[:10]) + (", ..." if len(skipped) > 10 else "")
        warnings.warn(
            f"{path}: skipped {len(skipped)} unreadable line(s) (line {shown}); "
            "a line torn by a crash mid-write is expected here",
            stacklevel=2,
        )
    return records


def append_jsonl(path: str | os.PathLike, record: Any) -> None:
    """Append ``json.dumps(record, ensure_ascii=False) + "\\n"`` (UTF-8) to `path`, flushed and
    fsynced, so a crash loses at most the line being written. If the file does not end with a
    newline (a torn last line), one is written first so the fragment cannot swallow this record.
    Parent folders are created."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    line = (_dumps(record, ensure_ascii=False) + "\n").encode("utf-8")
    with open(path, "a+b") as fh:
        end = fh.seek(0, os.SEEK_END)
        if end:
            fh.seek(end - 1)
            if fh.read(1) != b"\n":
                line = b"\n" + line
        fh.write(line)
        fh.flush()
        os.fsync(fh.fileno())
