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
ranks succeeded does rank 0 rename it to `<tag>/` and then replace `latest` (write + os.replace).
A failed write raises `CheckpointWriteError`, removes the partial directory and leaves the
previous checkpoint and `latest` untouched.
"""

from __future__ import annotations

import errno
import json
import os
import random
import re
import shutil
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
TRAINER_STATE_FILE = "trainer_state.json"


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
        tag = pointer.read_text().strip()
        if not tag or not (self.ckpt_dir / tag).is_dir():
            raise MissingFileError(
                f"{pointer} names checkpoint '{tag}', but {self.ckpt_dir / tag} does not exist; "
                "delete the `latest` file or point it at an existing global_step* directory"
            )
        return tag

    def complete_tags(self) -> list[str]:
        """Complete `global_step*` tags, oldest first."""
        if not self.ckpt_dir.is_dir():
            return []
        tags = [p.name for p in self.ckpt_dir.iterdir() if p.is_dir() and step_of_tag(p.name) is not None]
        return sorted(tags, key=step_of_tag)

    def remove_partial(self) -> None:
        """Delete `*.tmp` leftovers of a run killed while saving (rank 0 only)."""
        if _rank() != 0 or not self.ckpt_dir.is_dir():
            return
        for path in self.ckpt_dir.iterdir():
            if path.name.endswith(PARTIAL_SUFFIX):
                shutil.rmtree(path, ignore_errors=True) if path.is_dir() else path.unlink(missing_ok=True)

    # ---------------------------------------------------------------- save
    def save(self, engine, step: int, trainer_state: dict[str, Any]) -> Path:
        """Write tag `global_step{step}` atomically, update `latest`, prune old tags.

        trainer_state: JSON-serialisable (step, epoch, sampler state, ...); stored both in the
        DeepSpeed client_state and as trainer_state.json for humans and tools.
        """
        tag = tag_for_step(step)
        partial_tag = tag + PARTIAL_SUFFIX
        rank = _rank()
        error: BaseException | None = None
        try:
            if rank == 0:
                self.ckpt_dir.mkdir(parents=True, exist_ok=True)
                if (self.ckpt_dir / partial_tag).exists():
                    shutil.rmtree(self.ckpt_dir / partial_tag)
            _barrier()
            engine.save_checkpoint(
                str(self.ckpt_dir),
                tag=partial_tag,
                client_state={"trainer_state": trainer_state},
                save_latest=False,
                exclude_frozen_parameters=self.exclude_frozen_parameters,
            )
            partial_dir = self.ckpt_dir / partial_tag
            torch.save(capture_rng_state(), partial_dir / f"rng_state_rank{rank}.pt")
            if rank == 0:
                atomic_write_text(partial_dir / TRAINER_STATE_FILE, json.dumps(trainer_state, indent=2))
        except OSError as exc:
            error = exc
        if _any_rank_failed(error is not None):
            if rank == 0:
                shutil.rmtree(self.ckpt_dir / partial_tag, ignore_errors=True)
            _barrier()
            previous = self._latest_or_none()
            reason = f"{type(error).__name__}: {error}" if error is not None else "another rank failed to write"
            hint = " (disk full?)" if isinstance(error, OSError) and error.errno == errno.ENOSPC else ""
            raise CheckpointWriteError(
                f"could not write checkpoint '{tag}' to {self.ckpt_dir}{hint}: {reason}. "
                f"The previous checkpoint ({previous or 'none'}) and `latest` are unchanged."
            ) from error

        if rank == 0:
            final_dir = self.ckpt_dir / tag
            if final_dir.exists():  # re-saving a step (e.g. resumed exactly at a save point)
                shutil.rmtree(final_dir)
            os.replace(self.ckpt_dir / partial_tag, final_dir)
            atomic_write_text(self.ckpt_dir / "latest", tag)
            self._prune(keep=tag)
        _barrier()
        return self.ckpt_dir / tag

    def _latest_or_none(self) -> str | None:
        try:
            return self.latest_tag()
        except FileNotFoundError:
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
