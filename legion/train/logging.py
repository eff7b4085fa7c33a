"""Training logs: one JSON line per event in `<output_dir>/log.jsonl`, a tqdm bar, optional TB/wandb.

    log = TrainLogger(out_dir, rank, total_steps, tensorboard=False, wandb_project=None)
    log.train_step(step, {"loss": 1.2, "ce_loss": ...})   # bar postfix + JSONL
    log.event("validation", step, {"val_loss": ..., "val_giou": ...})
    log.close()

Only rank 0 writes anything; other ranks get a silent logger so call sites need no `if rank == 0`.
"""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm


def _jsonable(value: Any) -> Any:
    if hasattr(value, "item"):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return value


class TrainLogger:
    def __init__(
        self,
        out_dir: str | os.PathLike,
        rank: int = 0,
        total_steps: int = 0,
        initial_step: int = 0,
        tensorboard: bool = False,
        wandb_project: str | None = None,
        run_name: str | None = None,
        config: dict | None = None,
        progress: bool = True,
    ):
        self.enabled = rank == 0
        self.out_dir = Path(out_dir)
        self._jsonl = None
        self._bar = None
        self._tb = None
        self._wandb = None
        if not self.enabled:
            return
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self._jsonl = open(self.out_dir / "log.jsonl", "a", buffering=1)
        if progress:
            self._bar = tqdm(total=total_steps, initial=initial_step, desc="train", unit="step", dynamic_ncols=True)
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:  # tensorboard is optional
                self.print("tensorboard requested but not installed (pip install tensorboard); skipping it")
            else:
                self._tb = SummaryWriter(log_dir=str(self.out_dir / "tensorboard"))
        if wandb_project:
            try:
                import wandb
            except ImportError:
                self.print("wandb requested but not installed (pip install wandb); skipping it")
            else:
                self._wandb = wandb.init(project=wandb_project, name=run_name, config=config, dir=str(self.out_dir))

    def print(self, message: str) -> None:
        if self.enabled:
            (self._bar.write if self._bar is not None else print)(message)

    def event(self, kind: str, step: int, values: dict[str, Any]) -> None:
        """Append one record {"event", "step", "time", **values} to log.jsonl (+ TB/wandb scalars)."""
        if not self.enabled:
            return
        record = {"event": kind, "step": step, "time": round(time.time(), 3)}
        record.update({k: _jsonable(v) for k, v in values.items()})
        self._jsonl.write(json.dumps(record) + "\n")
        scalars = {k: v for k, v in record.items() if isinstance(v, (int, float)) and k not in ("step", "time")}
        if self._tb is not None:
            for key, value in scalars.items():
                self._tb.add_scalar(f"{kind}/{key}", value, step)
        if self._wandb is not None:
            self._wandb.log({f"{kind}/{k}": v for k, v in scalars.items()}, step=step)

    def train_step(self, step: int, values: dict[str, Any]) -> None:
        """One optimizer step: advance the bar, show the main numbers, log everything."""
        if not self.enabled:
            return
        self.event("train", step, values)
        if self._bar is not None:
            self._bar.update(step - self._bar.n)
            shown = {k: values[k] for k in ("loss", "ce_loss", "mask_loss", "lr", "samples_per_s") if k in values}
            self._bar.set_postfix(
                {k: (f"{_jsonable(v):.3g}" if isinstance(_jsonable(v), float) else v) for k, v in shown.items()},
                refresh=False,
            )

    def close(self) -> None:
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.close()
        if self._tb is not None:
            self._tb.close()
        if self._wandb is not None:
            self._wandb.finish()
        if self._jsonl is not None:
            self._jsonl.close()
