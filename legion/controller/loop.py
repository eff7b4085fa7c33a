"""The controller loop, shared by `legion regenerate` and `legion inpaint` (docs/controller.md, "Loop rules").

A recipe supplies only how the next image is made (`NextImageStep`) and its `LoopRules`; the loop does
the rest, for every round r = 0, 1, ...:

    step(r, previous round or None)  -> image, the prompt that made it, extra round fields
    LEGION analysis                  -> masks (union + per phrase, per-phrase fallback), has_artifact
    score(image, ORIGINAL prompt)    -> the round is written (round_XX/, its summary entry)
    best / patience                  round 0 is the first best; a later round becomes the best when its
                                     score beats the best by more than `min_improvement`, else it
                                     counts towards `patience` (reset by a new best)
    stop (in this order)             analysis_error  LEGION failed on this image (verdict "error")
                                     no_artifact     `stop_on_clean` and LEGION found nothing to fix
                                                     (verdict not "fake", or no masked pixel)
                                     no_improvement  `patience` > 0 rounds in a row were not a new best
                                     limit_reason    `max_rounds` images written, round 0 included
                                     a recipe's own  the step raised `StopCase(reason)` before making
                                                     its image; that round is not written

The summary (report.case_summary) keeps the best-scoring round (round 0 included) as `post` and the
last round's score as `last_score`.

Where the recipes differ, they say so in their rules: regenerate `max_rounds` counts images
(`max(1, max_rounds)`), stops with "max_rounds", `stop_on_clean` is configurable, default patience 1;
inpaint runs `max_iter + 1` images, stops with "max_iter", always stops when no mask is left (nothing to
inpaint), default patience 0 (never).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import numpy as np

from legion.config import ConfigError
from legion.controller.cases import Case, CaseWriter, has_artifact, record_masks
from legion.controller.report import case_summary, write_html, write_summary
from legion.record import PredictionRecord
from legion.utils.run_info import RunRecord


@dataclass(frozen=True)
class LoopRules:
    """When one case's loop stops (see the module docstring)."""

    max_rounds: int  # images in all, round 0 included (>= 1)
    limit_reason: str  # the stop reason once max_rounds images are written ("max_rounds", "max_iter")
    patience: int = 0  # stop after this many rounds in a row without a new best (0: never)
    min_improvement: float = 0.0  # a new best must beat the best score by more than this
    stop_on_clean: bool = True  # stop when LEGION finds no artifact

    def __post_init__(self):
        if self.max_rounds < 1:
            raise ConfigError(f"the loop needs max_rounds >= 1 (round 0 included), got {self.max_rounds}")


@dataclass
class NextImage:
    """What a recipe's step made for one round."""

    image: np.ndarray  # uint8 [H, W, 3]
    prompt: str  # the prompt that made it (prompt.txt, the round's `prompt`); not the scoring prompt
    fields: dict = field(default_factory=dict)  # extra round fields, written after has_artifact, mask_notes, seconds
    inpaint_mask: np.ndarray | None = None  # {0,1} [H, W]: written as mask_inpaint.png


@dataclass
class Round:
    """A written round, as the next step sees it."""

    index: int
    image: np.ndarray
    prompt: str  # the prompt that made the image
    record: PredictionRecord  # LEGION's analysis of the image
    union: np.ndarray  # uint8 {0,1} [H, W] union mask (rebuilt from the phrase masks when needed)
    has_artifact: bool
    score: float  # against the case's original prompt
    entry: dict  # the round's summary entry (summary.jsonl `rounds[...]`)


class StopCase(Exception):
    """Raised by a step to end the case before its round (e.g. the prompt reviser failed)."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


class NextImageStep(Protocol):
    def __call__(self, index: int, previous: Round | None) -> NextImage:
        """Round `index`'s image; `previous` is round index - 1 (None for round 0). May raise StopCase."""


def run_case(case: Case, step: NextImageStep, analyzer, scorer, writer: CaseWriter, rules: LoopRules) -> dict:
    """Run the loop for one case and write its rounds; returns its summary.jsonl entry.

    analyzer: `.analyze([image]) -> [record]` (legion.infer.Analyzer); scorer: `.score([image], [prompt])
    -> [float]` and `.name` (legion.controller.scoring.Scorer).
    """
    rounds: list[dict] = []
    best_round, since_best, stop_reason = 0, 0, rules.limit_reason
    previous: Round | None = None
    for index in range(rules.max_rounds):
        started = time.time()
        try:
            made = step(index, previous)
        except StopCase as stop:
            if index == 0:
                raise ValueError(f"{case.case_id}: a step may not stop the case before round 0") from stop
            stop_reason = stop.reason
            break
        image = made.image
        record = analyzer.analyze([image])[0]
        union, phrase_masks, notes = record_masks(record, image.shape[0], image.shape[1])
        found = has_artifact(record, union)
        score = scorer.score([image], [case.prompt])[0]  # always the ORIGINAL prompt
        facts = {"has_artifact": found, "mask_notes": notes, "seconds": round(time.time() - started, 3), **made.fields}
        entry = writer.write_round(
            index, image, made.prompt, record, score, union, phrase_masks, facts, inpaint_mask=made.inpaint_mask
        )
        rounds.append(entry)
        previous = Round(index, image, made.prompt, record, union, found, score, entry)
        if index > 0:
            if score > rounds[best_round]["score"] + rules.min_improvement:
                best_round, since_best = index, 0
            else:
                since_best += 1
        if record.verdict == "error":  # LEGION failed on this image: nothing to act on
            stop_reason = "analysis_error"
            break
        if rules.stop_on_clean and not found:
            stop_reason = "no_artifact"
            break
        if index > 0 and rules.patience > 0 and since_best >= rules.patience:
            stop_reason = "no_improvement"
            break
    source = str(case.image_path) if case.image_path else None
    return case_summary(case.case_id, case.prompt, source, rounds, best_round, stop_reason, scorer.name)


def run_cases(
    cases: Sequence[Case],
    run_one: Callable[[Case, CaseWriter], dict],
    out_dir: str | Path,
    scorer_name: str,
    command: str,
    title: str,
) -> tuple[list[dict], dict]:
    """Every case through `run_one(case, writer)` -> (summaries, aggregate scores); writes run_info.json,
    summary.jsonl, scores.json and index.html under out_dir. `command` names the progress bar and the
    command of scores.json and run_info.json."""
    from tqdm import tqdm

    with RunRecord(out_dir, command):
        progress = tqdm(cases, desc=command, unit="case")
        summaries = [run_one(case, CaseWriter(out_dir, case.case_id)) for case in progress]
        aggregate = write_summary(out_dir, summaries, scorer_name, command)
        write_html(out_dir, summaries, aggregate, title)
    return summaries, aggregate
