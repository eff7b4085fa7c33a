"""Crash-safe DeepSpeed checkpoints: atomic tags, a `latest` pointer, keep-last-N, exact resume.

Layout of `ckpt_dir` (DeepSpeed's own layout, so `zero_to_fp32.py` and `legion merge` read it):

    ckpt_dir/
      latest                      text file: the tag of the newest *complete* checkpoint
      global_step40/              one DeepSpeed tag (model states, ZeRO optimizer shards)
        trainer_state.json        step, epoch, sampler position, samples seen (rank 0)
        rng_state_rank{r}.pt      python / numpy / torch (/ cuda) RNG states of rank r
      global_step80/ ...
      zero_to_fp32.py             copied by DeepSpeed

Why atomic: a run killed (or out of disk) in the middle of `save_checkpoint` must never leave
`latest` pointing at a half-written tag. Every rank writes into `<tag>.tmp/`; only when all
ranks succeeded does rank 0 write `trainer_state.json` into it (so a `<tag>.tmp/` holding
`trainer_state.json` is complete), rename it to `<tag>/` and then replace `latest` (write +
os.replace). Re-saving an existing tag renames the old one to `<tag>.old/` first and deletes it
once the new one is in place. Any failed write (an OSError, or torch's RuntimeError "file write
failed" on a full disk) raises `CheckpointWriteError`, removes the partial directory and leaves the
previous checkpoint and `latest` untouched.

On resume, `recover` first finishes or undoes what a killed save left (a complete `<tag>.tmp/`
whose `<tag>/` is missing is renamed into place, an incomplete one is removed, a `<tag>.old/`
is restored or removed, temporary files of atomic writes are removed), then `resume_tag` picks the
tag named by `latest`, or, when `latest` is missing, unreadable or names no complete checkpoint,
the newest complete tag (with a note). No problem with `latest` ever makes a run start from step 0
over existing checkpoints: with no complete tag to fall back on it refuses (ResumeError), and
`checkpoint.resume: none` in a folder that holds checkpoints is refused too (they would be
overwritten and pruned).
"""

from __future__ import annotations

import errno
import json
import os
import random
import re
import shutil
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from legion.config import ConfigError
from legion.errors import LegionError, MissingFileError
from legion.utils.io import atomic_write_text

TAG_PATTERN = re.compile(r"^global_step(\d+)$")
PARTIAL_SUFFIX = ".tmp"
OLD_SUFFIX = ".old"  # a tag being replaced by a re-save of the same step
TRAINER_STATE_FILE = "trainer_state.json"
# temporary files of legion.utils.io's atomic writes (`latest`), left only by a process killed mid-write
ATOMIC_TEMP = re.compile(r"^\..+\.tmp-\d+-[0-9a-f]+$")


class CheckpointWriteError(LegionError, RuntimeError):
    """Writing a checkpoint failed; the previous checkpoint and `latest` are intact."""


class ResumeError(LegionError, RuntimeError):
    """A checkpoint to resume from that cannot be loaded."""


def tag_for_step(step: int) -> str:
    return f"global_step{step}"


def step_of_tag(tag: str) -> int | None:
    match = TAG_PATTERN.match(tag)
    return int(match.group(1)) if match else None


def capture_rng_state() -> dict[str, Any]:
    """All RNG states that influence training on this process (dropout, sampling, augmentation)."""
    # Only tensors, tuples and numbers, so the file loads with torch.load(weights_only=True).
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": (kind, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(cached)),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def _barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def _any_rank_failed(failed: bool) -> bool:
    if not (dist.is_available() and dist.is_initialized()):
        return failed
    flag = torch.tensor([1 if failed else 0], dtype=torch.int64)
    if dist.get_backend() == "nccl":
        flag = flag.cuda()
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    return bool(flag.item())


def _read_pointer(pointer: Path) -> str:
    return pointer.read_bytes().decode("utf-8").strip()


def _is_tag_name(tag: str) -> bool:
    """A checkpoint folder name `latest` may point at: a plain child name, no path."""
    return bool(tag) and tag not in (".", "..") and "/" not in tag and "\\" not in tag and "\0" not in tag


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def _free_bytes(path: Path) -> int | None:
    try:
        return shutil.disk_usage(path if path.exists() else path.parent).free
    except OSError:
        return None


def _note(message: str) -> None:
    if _rank() == 0:
        print(f"legion train: note: {message}", file=sys.stderr, flush=True)


class CheckpointManager:
    """Saves and restores DeepSpeed engines plus the trainer's own state in `ckpt_dir`.

    All ranks must call `save` and `load` (DeepSpeed collectives inside).
    """

    def __init__(self, ckpt_dir: str | os.PathLike, keep_last: int = 2, exclude_frozen_parameters: bool = False):
        if keep_last < 1:
            raise ConfigError(f"checkpoint.keep_last must be >= 1, got {keep_last}")
        self.ckpt_dir = Path(ckpt_dir)
        self.keep_last = keep_last
        self.exclude_frozen_parameters = exclude_frozen_parameters

    # ---------------------------------------------------------------- queries
    def latest_tag(self) -> str | None:
        """The tag named by `latest`, or None when there is no complete checkpoint."""
        pointer = self.ckpt_dir / "latest"
        if not pointer.is_file():
            return None
        try:
            tag = _read_pointer(pointer)
        except UnicodeDecodeError:
            tag = "<not text>"
        if not _is_tag_name(tag) or not (self.ckpt_dir / tag).is_dir():
            raise MissingFileError(
                f"{pointer} names checkpoint {tag!r}, but there is no such checkpoint in {self.ckpt_dir}; "
                f"checkpoint.resume=<tag> loads another one (found: {', '.join(self.complete_tags()) or 'none'})"
            )
        return tag

    def resumable_tags(self) -> list[str]:
        """Complete checkpoints of `legion train` (a tag folder holding trainer_state.json), oldest first."""
        return [t for t in self.complete_tags() if (self.ckpt_dir / t / TRAINER_STATE_FILE).is_file()]

    def resume_tag(self) -> str | None:
        """The tag `checkpoint.resume: auto` continues from: the one `latest` names when it is a complete
        checkpoint; else (latest missing, unreadable, or naming no complete checkpoint) the newest complete
        tag, with a note on stderr; None when the folder holds no checkpoint at all. ResumeError when there
        are checkpoints but none to resume from (nothing is changed: a run from step 0 would overwrite them)."""
        pointer = self.ckpt_dir / "latest"
        resumable = self.resumable_tags()
        problem = None
        if pointer.is_file():
            try:
                tag = _read_pointer(pointer)
            except (OSError, UnicodeDecodeError) as exc:
                problem = f"{pointer} is unreadable ({type(exc).__name__})"
            else:
                if tag in resumable:
                    return tag
                problem = f"{pointer} names {tag[:60]!r}, which is not a complete checkpoint in {self.ckpt_dir}"
        elif pointer.exists() or pointer.is_symlink():
            problem = f"{pointer} is not a file"
        elif resumable:
            problem = f"{pointer} is missing"
        if resumable:
            _note(f"{problem}; resuming from the newest complete checkpoint, {resumable[-1]}")
            return resumable[-1]
        others = self.complete_tags()
        if problem is None and not others:
            return None
        found = f"it holds {', '.join(others)}, none with {TRAINER_STATE_FILE}" if others else "it holds no checkpoint"
        raise ResumeError(
            f"{problem + '; ' if problem else ''}nothing to resume from in {self.ckpt_dir}: {found}. Nothing was "
            "changed. To train from step 0, use another output_dir"
            + (" (a run from step 0 here would overwrite them)" if others else " or checkpoint.resume=none")
        )

    def check_fresh_start(self) -> None:
        """`checkpoint.resume: none`: refused (ConfigError) when the folder holds checkpoints, which a run from
        step 0 would overwrite and prune."""
        tags = self.complete_tags()
        if tags:
            raise ConfigError(
                f"checkpoint.resume=none, but {self.ckpt_dir} holds checkpoints ({', '.join(tags[-3:])}) that a run "
                "from step 0 would overwrite and prune; use another output_dir, or checkpoint.resume=auto to continue"
            )

    def complete_tags(self) -> list[str]:
        """Complete `global_step*` tags, oldest first."""
        if not self.ckpt_dir.is_dir():
            return []
        tags = [p.name for p in self.ckpt_dir.iterdir() if p.is_dir() and step_of_tag(p.name) is not None]
        return sorted(tags, key=step_of_tag)

    def recover(self) -> list[str]:
        """Finish or undo what a run killed while saving left behind, before `latest` is read (every rank
        calls it; rank 0 acts, the others wait): a complete `<tag>.tmp` (it holds trainer_state.json) whose
        `<tag>` is missing is renamed into place, any other `<tag>.tmp` removed; a `<tag>.old` is restored
        when `<tag>` is missing, else removed; temporary files of atomic writes are removed. Returns what
        was done (also printed on stderr)."""
        notes: list[str] = []
        if _rank() == 0 and self.ckpt_dir.is_dir():
            entries = sorted(self.ckpt_dir.iterdir())
            for path in entries:
                tag = path.name[: -len(PARTIAL_SUFFIX)]
                if not (path.name.endswith(PARTIAL_SUFFIX) and _is_tag_name(tag)) or path.is_symlink():
                    continue
                final = self.ckpt_dir / tag
                if path.is_dir() and not final.exists() and (path / TRAINER_STATE_FILE).is_file():
                    os.rename(path, final)
                    notes.append(f"completed checkpoint {tag} (written, not yet renamed into place)")
                else:
                    _remove(path)
                    notes.append(f"removed the partial checkpoint {path.name}")
            for path in entries:
                tag = path.name[: -len(OLD_SUFFIX)]
                if not (path.name.endswith(OLD_SUFFIX) and _is_tag_name(tag)) or not path.exists():
                    continue
                if (self.ckpt_dir / tag).exists():
                    _remove(path)
                else:
                    os.rename(path, self.ckpt_dir / tag)
                    notes.append(f"restored checkpoint {tag} (its replacement was never completed)")
            for path in entries:
                if ATOMIC_TEMP.match(path.name) and (path.exists() or path.is_symlink()):
                    _remove(path)
            for note in notes:
                _note(note)
        _barrier()
        return notes

    # ---------------------------------------------------------------- save
    def save(self, engine, step: int, trainer_state: dict[str, Any]) -> Path:
        """Write tag `global_step{step}` atomically, update `latest`, prune old tags.

        trainer_state: JSON-serialisable (step, epoch, sampler state, ...); stored both in the
        DeepSpeed client_state and as trainer_state.json for humans and tools (written last: it marks
        the tag complete).
        """
        tag = tag_for_step(step)
        partial_dir = self.ckpt_dir / (tag + PARTIAL_SUFFIX)
        rank = _rank()
        error: BaseException | None = None
        try:
            if rank == 0:
                self.ckpt_dir.mkdir(parents=True, exist_ok=True)
                if partial_dir.exists():
                    shutil.rmtree(partial_dir)
            _barrier()
            engine.save_checkpoint(
                str(self.ckpt_dir),
                tag=partial_dir.name,
                client_state={"trainer_state": trainer_state},
                save_latest=False,
                exclude_frozen_parameters=self.exclude_frozen_parameters,
            )
            torch.save(capture_rng_state(), partial_dir / f"rng_state_rank{rank}.pt")
        except Exception as exc:  # OSError, and torch's RuntimeError ("file write failed") on a full disk
            error = exc
        if _any_rank_failed(error is not None):
            self._failed(tag, error)
        # every rank wrote its part: rank 0 marks the tag complete and puts it in place
        try:
            if rank == 0:
                atomic_write_text(partial_dir / TRAINER_STATE_FILE, json.dumps(trainer_state, indent=2))
                self._publish(tag, partial_dir)
        except Exception as exc:
            error = exc
        if _any_rank_failed(error is not None):
            self._failed(tag, error)
        return self.ckpt_dir / tag

    def _publish(self, tag: str, partial_dir: Path) -> None:
        """Rank 0: `<tag>.tmp` -> `<tag>` (an existing `<tag>` is kept as `<tag>.old` until then), `latest`, prune."""
        final_dir = self.ckpt_dir / tag
        if final_dir.exists():  # re-saving a step (e.g. resumed from an older tag)
            aside = self.ckpt_dir / (tag + OLD_SUFFIX)
            if aside.exists():
                shutil.rmtree(aside)
            os.rename(final_dir, aside)
            os.rename(partial_dir, final_dir)
            shutil.rmtree(aside, ignore_errors=True)
        else:
            os.rename(partial_dir, final_dir)
        atomic_write_text(self.ckpt_dir / "latest", tag)
        self._prune(keep=tag)

    def _failed(self, tag: str, error: BaseException | None) -> None:
        """Every rank: remove the partial tag (rank 0), then raise CheckpointWriteError."""
        if _rank() == 0:
            shutil.rmtree(self.ckpt_dir / (tag + PARTIAL_SUFFIX), ignore_errors=True)
        _barrier()
        previous = self._latest_or_none()
        reason = f"{type(error).__name__}: {error}" if error is not None else "another rank failed to write"
        free = _free_bytes(self.ckpt_dir)
        full = (isinstance(error, OSError) and error.errno == errno.ENOSPC) or any(
            text in str(error) for text in ("No space left", "write failed")
        )
        details = ["disk full?"] if full or (free is not None and free < 2**30) else []
        details += [f"{free / 2**30:.2f} GiB free there"] if free is not None else []
        hint = f" ({', '.join(details)})" if details else ""
        raise CheckpointWriteError(
            f"could not write checkpoint '{tag}' to {self.ckpt_dir}{hint}: {reason.strip()}. The previous "
            f"checkpoint ({previous or 'none'}) and `latest` are unchanged; the partial files were removed."
        ) from error

    def _latest_or_none(self) -> str | None:
        try:
            return self.latest_tag()
        except (OSError, UnicodeDecodeError):
            return None

    def _prune(self, keep: str) -> None:
        tags = self.complete_tags()
        for tag in tags[: -self.keep_last]:
            if tag != keep:
                shutil.rmtree(self.ckpt_dir / tag, ignore_errors=True)

    # ---------------------------------------------------------------- load
    def load(self, engine, tag: str | None = None) -> dict[str, Any]:
        """Restore engine (weights, optimizer, LR scheduler) and this rank's RNG states.

        Returns the trainer_state dict that was saved with the tag.
        """
        tag = tag or self.latest_tag()
        if tag is None:
            raise MissingFileError(f"no checkpoint to resume from in {self.ckpt_dir}")
        load_path, client_state = engine.load_checkpoint(str(self.ckpt_dir), tag=tag)
        if load_path is None:
            raise ResumeError(f"DeepSpeed could not load checkpoint {self.ckpt_dir / tag}")
        tag_dir = self.ckpt_dir / tag
        rng_file = tag_dir / f"rng_state_rank{_rank()}.pt"
        if rng_file.is_file():
            restore_rng_state(torch.load(rng_file, weights_only=True))
        state = (client_state or {}).get("trainer_state")
        if state is None and (tag_dir / TRAINER_STATE_FILE).is_file():
            state = json.loads((tag_dir / TRAINER_STATE_FILE).read_text())
        if state is None:
            raise ResumeError(f"{tag_dir} has no trainer state; was it written by `legion train`?")
        return state
