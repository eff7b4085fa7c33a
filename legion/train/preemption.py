"""Stopping a training run cleanly on a cluster's signal (Slurm preemption, end of the time limit).

    with StopSignals() as signals:          # SIGTERM and SIGUSR1 set a flag instead of killing the process
        ...                                 # the loop reads `signals.received` at each optimizer step
    raise TrainingPreempted(...)            # after the checkpoint: exit code PREEMPTED_EXIT_CODE (75)

Slurm sends SIGTERM when it preempts or cancels a job (then SIGKILL after its grace time) and, with
``#SBATCH --signal=USR1@300``, SIGUSR1 five minutes before the time limit. `legion train` then finishes
the optimizer step it is in, writes a checkpoint (unless that step just wrote one), and exits with
code 75, which `scripts/slurm/train_loc_exp.sbatch` answers by requeueing the job; the next run resumes
from that checkpoint (`checkpoint.resume: auto`) to the same weights as an uninterrupted run. Every rank
gets the signal (srun delivers it to each task); the ranks agree on the step to stop at through the
all-reduce that checks each step (`loc_exp.StepGuard`), so no rank waits for another in a collective.

Every rank exits with 75. Launched by srun (the sbatch script) the job step reports 75; torchrun and
the deepspeed launcher turn a worker's non-zero exit into their own failure code (1), so wrappers around
them should look for the ``preempted`` event in ``log.jsonl`` instead.

75 is EX_TEMPFAIL of sysexits.h ("temporary failure; the user is invited to retry"): distinct from 0
(done), 1 (failed work), 2 (usage), 130 (Ctrl-C), 124 (coreutils `timeout`) and 128+N (killed by a
signal), so a wrapper can tell "checkpointed, run me again" from every other ending.
"""

from __future__ import annotations

import signal
import threading

from legion.errors import LegionError

PREEMPTED_EXIT_CODE = 75
STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class TrainingPreempted(LegionError):
    """Training stopped on SIGTERM / SIGUSR1 after writing a checkpoint. Exit code 75: run it again."""

    exit_code = PREEMPTED_EXIT_CODE
    label = "stopped"  # `legion train: stopped: ...` (legion.cli), not "error"
    run_status = "interrupted"  # run_info.json


class StopSignals:
    """While active (a context manager, main thread only), SIGTERM and SIGUSR1 only record that they
    arrived (`received`: the signal's number, 0 when none); the previous handlers come back on exit.
    Elsewhere than in the main thread it does nothing (Python delivers signals to the main thread)."""

    def __init__(self, signals=STOP_SIGNALS):
        self.signals = tuple(signals)
        self.received = 0
        self._previous: dict[int, object] = {}

    def _handle(self, signum, frame) -> None:
        self.received = self.received or signum

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():
            for sig in self.signals:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, previous in self._previous.items():
            signal.signal(sig, previous)
        self._previous.clear()

    @staticmethod
    def name(signum: int) -> str:
        try:
            return signal.Signals(signum).name
        except ValueError:
            return f"signal {signum}"
