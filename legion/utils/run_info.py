"""`run_info.json`: where a result came from, written next to every recipe's outputs.

    with RunRecord(output_dir, "infer") as record:     # written at once: status "running"
        ...
        record.update(images=123)                      # recipe facts, written again
    # on exit: status "done" | "failed" | "interrupted", end time, seconds

Recorded: the command and its command line, start/end time, the git commit of the code (and whether the
working tree had uncommitted changes), the versions of LEGION, Python and the packages that shape
results, the machine and its accelerator. Only rank 0 writes (RANK environment variable).
"""

from __future__ import annotations

import datetime
import functools
import importlib.metadata
import json
import os
import platform
import socket
import subprocess
import sys
import time
import warnings
from pathlib import Path

from legion.utils.io import atomic_write_text

FILE_NAME = "run_info.json"
PACKAGES = (
    "torch",
    "torchvision",
    "transformers",
    "tokenizers",
    "sentencepiece",
    "safetensors",
    "accelerate",
    "peft",
    "deepspeed",
    "segment-anything",
    "pycocotools",
    "numpy",
    "opencv-python-headless",
    "Pillow",
    "rouge-score",
    "sentence-transformers",
    "diffusers",
    "bitsandbytes",
)
REPO = Path(__file__).resolve().parents[2]


def _now() -> str:
    return datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")


def git_state(repo: Path = REPO) -> dict:
    """{"commit": sha, "dirty": bool} of the checkout holding this code; nulls when it is not a git checkout."""

    def git(*args: str) -> str | None:
        try:
            out = subprocess.run(["git", "-C", str(repo), *args], capture_output=True, text=True, timeout=10)
        except (OSError, subprocess.SubprocessError):
            return None
        return out.stdout.strip() if out.returncode == 0 else None

    commit = git("rev-parse", "HEAD")
    if commit is None:
        return {"commit": None, "dirty": None}
    status = git("status", "--porcelain", "--untracked-files=no")
    return {"commit": commit, "dirty": bool(status) if status is not None else None}


def package_versions() -> dict[str, str | None]:
    versions = {}
    for name in PACKAGES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def device_info() -> dict:
    info = {"host": socket.gethostname(), "platform": platform.platform(), "cpus": os.cpu_count()}
    torch = sys.modules.get("torch")  # only when the recipe imported it: never import torch for this
    if torch is not None and torch.cuda.is_available():
        info["cuda"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    return info


def provenance() -> dict:
    from legion import __version__

    return {
        "legion": __version__,
        "git": git_state(),
        "python": platform.python_version(),
        "packages": package_versions(),
        "machine": device_info(),
        "command_line": list(sys.argv),
        "cwd": os.getcwd(),
    }


class RunRecord:
    """The run_info.json of one recipe run (see the module docstring)."""

    def __init__(
        self,
        output_dir: str | os.PathLike,
        command: str,
        write: bool | None = None,
        eager: bool = True,
        file_name: str = FILE_NAME,
        **facts,
    ):
        """eager: write at once (status "running": long recipes); else at the first update or at the end.
        A run that stops on a usage error (a typo, a missing input) before anything was written writes
        nothing (and so creates no output folder)."""
        self.path = Path(output_dir) / file_name
        self.write = int(os.environ.get("RANK", 0)) == 0 if write is None else write
        self._start = time.time()
        self._written = False
        self.info = {"command": command, "status": "running", "start": _now(), "end": None, "seconds": None}
        if self.write:  # git subprocesses and package look-ups: only where the file is written
            self.info.update(provenance())
        self.info.update(facts)
        if eager:
            self._save()

    def update(self, **facts) -> None:
        self.info.update(facts)
        self._save()

    def finish(self, status: str = "done", error: str | None = None) -> None:
        self.info.update(status=status, end=_now(), seconds=round(time.time() - self._start, 3))
        if error:
            self.info["error"] = error
        self._save()

    def _save(self) -> None:
        if self.write:
            atomic_write_text(self.path, json.dumps(self.info, indent=2, default=str) + "\n")
            self._written = True

    def __enter__(self) -> RunRecord:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        from legion.errors import UsageError

        if exc_type is not None and issubclass(exc_type, UsageError) and not self._written:
            return
        if exc_type is None:
            self.finish("done")
            return
        try:  # the run's own error is what the user must see, not a failure to record it
            if issubclass(exc_type, KeyboardInterrupt) or getattr(exc, "run_status", None) == "interrupted":
                self.finish("interrupted", None if issubclass(exc_type, KeyboardInterrupt) else str(exc))
            else:
                self.finish("failed", f"{exc_type.__name__}: {exc}")
        except Exception as record_error:  # e.g. the disk that failed the run is full
            warnings.warn(f"could not update {self.path}: {record_error}", stacklevel=2)


def recorded(command: str, output_dir, eager: bool = True, file_name=None):
    """Decorator: run the recipe function inside a `RunRecord`; `output_dir(*args, **kwargs)` says where
    (and `file_name(*args, **kwargs)`, when given, under which name)."""

    def decorate(function):
        @functools.wraps(function)
        def wrapper(*args, **kwargs):
            name = file_name(*args, **kwargs) if file_name else FILE_NAME
            with RunRecord(output_dir(*args, **kwargs), command, eager=eager, file_name=name):
                return function(*args, **kwargs)

        return wrapper

    return decorate
