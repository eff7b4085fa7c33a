"""The errors LEGION raises on purpose, and the exit code each one gives.

Every error we raise for a user to read derives from `LegionError`. `legion.cli.main` catches it
once, prints ONE line on stderr, ``legion <command>: error: <message>``, and returns the class's
``exit_code``; with the environment variable ``LEGION_DEBUG=1`` it re-raises instead, so the
traceback shows. Any other exception is a bug and keeps its normal traceback. Ctrl-C exits 130.

Two kinds:

- **usage** (exit code 2, `UsageError`): the command cannot start as asked: a bad config key or
  value, a missing required option, a path given on the command line (or as a command's main input
  in its config) that does not exist, an unusable inputs file. Fix the command and re-run.
- **failed work** (exit code 1, plain `LegionError`): the command started and something it read,
  loaded or wrote failed: data unreadable, a checkpoint or model that does not load, a write that
  failed. Loaders (models, pipelines, scorers, revisers) report as failed work even when the cause
  is a config value: they cannot tell whether the fix is in the command or on the disk.

Each class keeps the builtin base it had (or the builtin it replaces), so ``except ValueError`` /
``except FileNotFoundError`` code keeps working.

| class | where | builtin base | kind | exit |
|---|---|---|---|---|
| `LegionError` | legion/errors.py | Exception | failed work | 1 |
| `UsageError` | legion/errors.py | Exception | usage | 2 |
| `OptionError` | legion/errors.py | ValueError | usage: bad option/argument value or combination | 2 |
| `InputNotFoundError` | legion/errors.py | FileNotFoundError | usage: a path the user named does not exist | 2 |
| `MissingDependencyError` | legion/errors.py | ImportError | usage: a setting needs an optional package | 2 |
| `DataError` | legion/errors.py | ValueError | failed work: a file read is unusable | 1 |
| `MissingFileError` | legion/errors.py | FileNotFoundError | failed work: a file the work needs is missing | 1 |
| `ConfigError` | legion/config.py | ValueError | usage | 2 |
| `CaseError` | legion/controller/cases.py | ValueError | usage (the controller's inputs file) | 2 |
| `InferError` | legion/infer.py | RuntimeError | usage (missing model/image/output paths) | 2 |
| `PipelineLoadError` | legion/controller/pipelines.py | RuntimeError | failed work | 1 |
| `ReviserError` | legion/controller/prompt_reviser.py | RuntimeError | failed work | 1 |
| `ScorerLoadError` | legion/controller/scoring.py | RuntimeError | failed work | 1 |
| `BenchmarkFormatError` | legion/data/benchmarks.py | ValueError | failed work | 1 |
| `DetectionDataError` | legion/data/detection.py | ValueError | failed work | 1 |
| `ImageReadError` | legion/data/images.py | Exception | failed work | 1 |
| `AnnotationFormatError` | legion/data/synthscars.py | ValueError | failed work | 1 |
| `PathEscapeError` | legion/data/synthscars.py | ValueError | failed work | 1 |
| `MergeError` | legion/merge.py | RuntimeError | failed work | 1 |
| `CheckpointError` | legion/model/builders.py | ValueError | failed work | 1 |
| `DetectorLoadError` | legion/model/detector.py | RuntimeError | failed work | 1 |
| `CheckpointWriteError` | legion/train/checkpointing.py | RuntimeError | failed work | 1 |
| `ResumeError` | legion/train/checkpointing.py | RuntimeError | failed work | 1 |
| `TrainingPreempted` | legion/train/preemption.py | Exception | stopped by SIGTERM/SIGUSR1, checkpoint saved | 75 |

`TrainingPreempted` is the one exception to the two kinds: training stopped by SIGTERM / SIGUSR1 (Slurm)
after writing a checkpoint prints ``legion train: stopped: <message>`` and exits with 75 (EX_TEMPFAIL:
run the same command again to resume).

Commands check their main inputs before they start (`require_path`), so a mistyped path is a
usage error (2) even where the library function that would read it raises a failed-work class.
"""

from __future__ import annotations

import os
from pathlib import Path


class LegionError(Exception):
    """An error raised on purpose, with a message meant for the user. Exit code 1: failed work."""

    exit_code = 1
    label = "error"  # `legion <command>: <label>: <message>` (legion.cli)


class UsageError(LegionError):
    """The command cannot start as asked. Exit code 2."""

    exit_code = 2


class OptionError(UsageError, ValueError):
    """A command-line option or argument value (or combination) the command cannot use."""


class InputNotFoundError(UsageError, FileNotFoundError):
    """A path the user named (on the command line or as a command's main input) does not exist."""


class MissingDependencyError(UsageError, ImportError):
    """A setting needs an optional package that is not installed (the message says how to install it)."""


class DataError(LegionError, ValueError):
    """A file the command reads is there but unusable (malformed, empty, inconsistent)."""


class MissingFileError(LegionError, FileNotFoundError):
    """A file the work needs is missing from a folder that exists (a checkpoint's weights, ...)."""


def require_path(path: str | os.PathLike, what: str, kind: str = "any") -> Path:
    """``path`` as a Path when it exists (``kind``: "any", "file" or "dir"); else InputNotFoundError
    naming ``what`` (the option or config key, e.g. "--pred" or "data.root")."""
    p = Path(path)
    ok = {"any": p.exists, "file": p.is_file, "dir": p.is_dir}[kind]()
    if not ok:
        if p.exists():
            raise InputNotFoundError(f"{what} {path}: not a {'file' if kind == 'file' else 'directory'}")
        noun = {"any": "file or directory", "file": "file", "dir": "directory"}[kind]
        raise InputNotFoundError(f"{what} {path}: no such {noun}")
    return p


def one_line(exc: BaseException) -> str:
    """The exception's message on one line (its lines joined with " | "), or its class name."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    return " | ".join(lines) or type(exc).__name__
