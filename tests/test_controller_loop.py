"""The controller loop's rules (legion/controller/loop.py), tested through the real loop and the real
CaseWriter / report code. The analyser, scorer and next-image step are simple stand-ins for LEGION, the
preference scorer and the diffusion pipelines: each returns what the test scripts, round by round."""

import json

import numpy as np
import pytest

from legion.config import ConfigError
from legion.controller.cases import Case, CaseWriter
from legion.controller.loop import LoopRules, NextImage, StopCase, run_case, run_cases
from legion.record import PredictionRecord
from legion.utils.rle import mask_to_rle

H, W = 6, 8
PROMPT = "a cat on a sofa"


def _mask(rows=slice(1, 3), cols=slice(2, 5)):
    mask = np.zeros((H, W), np.uint8)
    mask[rows, cols] = 1
    return mask


def fake(mask=None, phrases=("left paw",)):
    """A LEGION record with a fake verdict and one phrase mask (its union is the same mask)."""
    mask = _mask() if mask is None else mask
    return {
        "verdict": "fake",
        "explanation": "The " + " and ".join(phrases) + " look wrong.",
        "phrases": list(phrases),
        "masks": [mask_to_rle(mask)],
        "union_mask": mask_to_rle(mask),
    }


REAL = {"verdict": "real", "explanation": "", "phrases": [], "masks": [], "union_mask": None}
ERROR = {"verdict": "error", "error": "RuntimeError: boom", "phrases": [], "masks": [], "union_mask": None}
FAKE_NO_MASK = {"verdict": "fake", "explanation": "odd", "phrases": [], "masks": [], "union_mask": None}


class ScriptedAnalyzer:
    """Returns records[k] on the k-th call (the last one again when the script runs out)."""

    def __init__(self, *records):
        self.records, self.seen = list(records), []

    def analyze(self, images):
        assert len(images) == 1
        self.seen.append(images[0])
        return [PredictionRecord(**self.records[min(len(self.seen) - 1, len(self.records) - 1)])]


class ScriptedScorer:
    name = "scripted"

    def __init__(self, *scores):
        self.scores, self.calls = list(scores), []

    def score(self, images, prompts):
        self.calls.append(list(prompts))
        return [self.scores[len(self.calls) - 1]]


class Step:
    """Round r's image is filled with r; its prompt is 'prompt r'; it adds one field of its own."""

    def __init__(self, stop_at=None, inpaint=False):
        self.calls, self.stop_at, self.inpaint = [], stop_at, inpaint

    def __call__(self, index, previous):
        self.calls.append((index, previous))
        if index == self.stop_at:
            raise StopCase("step_gave_up")
        image = np.full((H, W, 3), index, np.uint8)
        mask = previous.union if (self.inpaint and previous is not None) else None
        return NextImage(image, f"prompt {index}", {"made_by": f"step {index}"}, inpaint_mask=mask)


def run(tmp_path, scores, records=(), rules=None, step=None, **rule_args):
    rules = rules or LoopRules(**{"max_rounds": len(scores), "limit_reason": "max_rounds", **rule_args})
    analyzer = ScriptedAnalyzer(*(records or [fake()]))
    scorer = ScriptedScorer(*scores)
    step = step or Step()
    summary = run_case(Case("c", PROMPT), step, analyzer, scorer, CaseWriter(tmp_path, "c"), rules)
    return summary, step, analyzer, scorer


def _scores(summary):
    return [r["score"] for r in summary["rounds"]]


@pytest.mark.parametrize(
    "scores, best",
    [([0.5, 0.3, 0.4], 0), ([0.1, 0.3, 0.2], 1), ([0.1, 0.2, 0.3], 2), ([0.3, 0.3, 0.3], 0)],
)
def test_best_round_is_the_best_scoring_one_round_0_included(tmp_path, scores, best):
    summary, *_ = run(tmp_path, scores)
    assert summary["stop_reason"] == "max_rounds" and summary["num_rounds"] == 3
    assert summary["best_round"] == best  # a tie does not beat the best: the earlier round stays
    assert (summary["pre_score"], summary["post_score"], summary["last_score"]) == (scores[0], scores[best], scores[2])
    assert summary["final_prompt"] == f"prompt {best}"


def test_patience_counts_rounds_in_a_row_without_a_new_best(tmp_path):
    # patience 1: the first round that does not beat the best ends the case (regenerate's default)
    summary, *_ = run(tmp_path / "a", [0.2, 0.3, 0.3, 0.9], patience=1)
    assert summary["stop_reason"] == "no_improvement" and _scores(summary) == [0.2, 0.3, 0.3]
    assert summary["best_round"] == 1
    # patience 2: a new best resets the count
    summary, *_ = run(tmp_path / "b", [0.2, 0.1, 0.3, 0.25, 0.2, 0.9], patience=2)
    assert summary["stop_reason"] == "no_improvement" and summary["num_rounds"] == 5
    assert summary["best_round"] == 2
    # round 0 alone never stops on patience
    summary, *_ = run(tmp_path / "c", [0.2], patience=1)
    assert summary["stop_reason"] == "max_rounds"


def test_patience_0_never_stops(tmp_path):
    rules = LoopRules(max_rounds=4, limit_reason="max_iter", patience=0)
    summary, step, *_ = run(tmp_path, [0.9, 0.5, 0.4, 0.3], rules=rules)
    assert summary["stop_reason"] == "max_iter" and summary["num_rounds"] == 4 and summary["best_round"] == 0
    assert [index for index, _ in step.calls] == [0, 1, 2, 3]


def test_min_improvement_a_new_best_must_beat_the_best_by_more(tmp_path):
    # 0.24 is higher than 0.2 but not by more than 0.05: not a new best, and patience 1 stops
    summary, *_ = run(tmp_path / "a", [0.2, 0.24, 0.9], patience=1, min_improvement=0.05)
    assert summary["stop_reason"] == "no_improvement" and summary["best_round"] == 0
    assert summary["post_score"] == 0.2 and summary["last_score"] == 0.24
    # 0.26 is; 0.30 is not (it is compared with the best, 0.26, + 0.05)
    summary, *_ = run(tmp_path / "b", [0.2, 0.26, 0.30, 0.9], patience=1, min_improvement=0.05)
    assert summary["stop_reason"] == "no_improvement" and summary["num_rounds"] == 3
    assert summary["best_round"] == 1
    # without patience it only decides which round is the best
    summary, *_ = run(tmp_path / "c", [0.2, 0.24, 0.3], patience=0, min_improvement=0.05)
    assert summary["stop_reason"] == "max_rounds" and summary["best_round"] == 2


def test_stop_on_clean(tmp_path):
    # verdict real, or fake without a masked pixel: nothing to fix
    for name, clean in (("real", REAL), ("nomask", FAKE_NO_MASK)):
        summary, *_ = run(tmp_path / name, [0.1, 0.2, 0.3], records=[fake(), clean, fake()])
        assert summary["stop_reason"] == "no_artifact" and summary["num_rounds"] == 2
        assert [r["has_artifact"] for r in summary["rounds"]] == [True, False]
        assert summary["best_round"] == 1  # the clean round is still scored and can be the best
    summary, *_ = run(tmp_path / "r0", [0.1, 0.2], records=[REAL])
    assert summary["stop_reason"] == "no_artifact" and summary["num_rounds"] == 1
    # stop_on_clean off (regenerate's option): clean rounds go on
    summary, *_ = run(tmp_path / "off", [0.1, 0.2, 0.3], records=[REAL], stop_on_clean=False)
    assert summary["stop_reason"] == "max_rounds" and summary["num_rounds"] == 3


def test_analysis_error_stops_and_is_checked_first(tmp_path):
    # an error record has no mask either: analysis_error wins over no_artifact (and over patience)
    summary, *_ = run(tmp_path / "a", [0.3, 0.1, 0.9], records=[fake(), ERROR], patience=1)
    assert summary["stop_reason"] == "analysis_error" and summary["num_rounds"] == 2
    assert summary["rounds"][1]["verdict"] == "error" and summary["rounds"][1]["score"] == 0.1
    summary, *_ = run(tmp_path / "b", [0.3, 0.1], records=[ERROR], stop_on_clean=False)
    assert summary["stop_reason"] == "analysis_error" and summary["num_rounds"] == 1
    analysis = json.loads((tmp_path / "b" / "cases" / "c" / "round_00" / "analysis.json").read_text())
    assert analysis["record"]["error"] == "RuntimeError: boom"


def test_a_step_can_stop_the_case_before_its_round(tmp_path):
    summary, step, analyzer, scorer = run(tmp_path, [0.1, 0.2, 0.3, 0.4], step=Step(stop_at=2))
    assert summary["stop_reason"] == "step_gave_up" and summary["num_rounds"] == 2
    assert len(analyzer.seen) == 2 and len(scorer.calls) == 2
    assert not (tmp_path / "cases" / "c" / "round_02").exists()
    with pytest.raises(ValueError, match="before round 0"):
        run(tmp_path / "r0", [0.1], step=Step(stop_at=0))
    with pytest.raises(ConfigError, match="max_rounds >= 1"):  # a ValueError, exit code 2 from the command line
        run(tmp_path / "none", [0.1], rules=LoopRules(max_rounds=0, limit_reason="max_iter"))


def test_each_step_sees_the_previous_round(tmp_path):
    first, second = _mask(slice(0, 2), slice(0, 3)), _mask(slice(3, 6), slice(4, 8))
    records = [fake(first, ("tail",)), fake(second, ("ear", "eye")), fake()]
    summary, step, analyzer, _ = run(tmp_path, [0.1, 0.2, 0.3], records=records)
    (i0, p0), (i1, p1), (i2, p2) = step.calls
    assert (i0, i1, i2) == (0, 1, 2) and p0 is None
    assert p1.index == 0 and p1.prompt == "prompt 0" and p1.record.phrases == ["tail"]
    assert np.array_equal(p1.union, first) and p1.has_artifact and p1.score == 0.1
    assert np.array_equal(p1.image, analyzer.seen[0]) and p1.entry == summary["rounds"][0]
    assert p2.index == 1 and np.array_equal(p2.union, second)
    assert p2.record.explanation == "The ear and eye look wrong."


def test_what_each_round_writes(tmp_path):
    broken = fake()
    broken["masks"] = [mask_to_rle(_mask()), {"size": [H, W], "counts": 12345}]
    summary, _, _, scorer = run(tmp_path, [0.1, 0.2], records=[fake(), broken], step=Step(inpaint=True))
    # every image is scored against the case's ORIGINAL prompt, whatever prompt made it
    assert scorer.calls == [[PROMPT], [PROMPT]]
    assert summary["case_id"] == "c" and summary["prompt"] == PROMPT and summary["source_image"] is None
    assert summary["scorer"] == "scripted"
    r0, r1 = summary["rounds"]
    # the loop's round fields come first, then the step's own
    assert list(r1)[-4:] == ["has_artifact", "mask_notes", "seconds", "made_by"]
    assert r1["made_by"] == "step 1" and r1["prompt"] == "prompt 1" and r1["phrases"] == ["left paw"]
    assert r1["mask_notes"] and "mask 1 skipped" in r1["mask_notes"][0] and r0["mask_notes"] == []
    assert r1["artifact_fraction"] == pytest.approx(_mask().mean()) and isinstance(r1["seconds"], float)
    assert (r0["image"], r0["mask"]) == ("cases/c/round_00/image.png", "cases/c/round_00/mask_union.png")
    folders = [tmp_path / "cases" / "c" / f"round_{k:02d}" for k in range(2)]
    assert sorted(p.name for p in folders[0].iterdir()) == [
        "analysis.json",
        "image.png",
        "mask_00.png",
        "mask_union.png",
        "prompt.txt",
    ]
    assert "mask_inpaint.png" in {p.name for p in folders[1].iterdir()}  # the step's mask, when it has one
    assert (folders[1] / "prompt.txt").read_text() == "prompt 1\n"
    analysis = json.loads((folders[1] / "analysis.json").read_text())
    assert analysis["round"] == r1 and analysis["record"]["verdict"] == "fake"


def test_run_cases_writes_summary_scores_and_page(tmp_path):
    def one(case, writer):
        rules = LoopRules(max_rounds=2, limit_reason="max_iter")
        scores = {"a": (0.2, 0.3), "b": (0.4, 0.2)}[case.case_id]
        return run_case(case, Step(), ScriptedAnalyzer(fake()), ScriptedScorer(*scores), writer, rules)

    summaries, aggregate = run_cases([Case("a", "x"), Case("b", "y")], one, tmp_path, "scripted", "inpaint", "T<1>")
    assert [s["case_id"] for s in summaries] == ["a", "b"] and [s["best_round"] for s in summaries] == [1, 0]
    lines = [json.loads(line) for line in (tmp_path / "summary.jsonl").read_text().splitlines()]
    assert lines == summaries
    saved = json.loads((tmp_path / "scores.json").read_text())
    assert saved == aggregate and saved["command"] == "inpaint" and saved["scorer"] == "scripted"
    assert saved["stop_reasons"] == {"max_iter": 2} and saved["post_mean"] == pytest.approx(0.35)
    page = (tmp_path / "index.html").read_text()
    assert "<title>T&lt;1&gt;</title>" in page and "cases/b/round_00/image.png" in page
    run_info = json.loads((tmp_path / "run_info.json").read_text())
    assert run_info["command"] == "inpaint" and run_info["status"] == "done"


def test_the_recipes_rules():
    from legion.controller import inpaint, regenerate

    rules = regenerate.loop_rules(regenerate.RegenerateConfig(max_rounds=0, stop_on_clean=False, min_improvement=0.1))
    assert rules == LoopRules(1, "max_rounds", patience=1, min_improvement=0.1, stop_on_clean=False)
    assert regenerate.loop_rules(regenerate.RegenerateConfig()) == LoopRules(3, "max_rounds", 1, 0.0, True)
    # inpaint: max_iter inpaintings after the original; no mask left always stops; patience 0 = never
    assert inpaint.loop_rules(inpaint.InpaintConfig(max_iter=2)) == LoopRules(3, "max_iter", 0, 0.0, True)


def test_regeneration_stops_when_the_reviser_fails(tmp_path, capsys):
    from legion.controller.prompt_reviser import PromptReviser, ReviserError
    from legion.controller.regenerate import RegenerateConfig, regenerate_case

    class Failing(PromptReviser):
        def revise(self, prompt, explanation, phrases=()):
            raise ReviserError("endpoint down")

    start = np.zeros((H, W, 3), np.uint8)
    summary = regenerate_case(
        Case("r", PROMPT),
        start,
        ScriptedAnalyzer(fake()),
        None,  # never called: round 0 is the starting image and round 1 stops before generating
        Failing(),
        ScriptedScorer(0.1),
        RegenerateConfig(max_rounds=3),
        CaseWriter(tmp_path, "r"),
    )
    assert summary["stop_reason"] == "reviser_error" and summary["num_rounds"] == 1
    assert summary["rounds"][0]["generated"] is False and summary["rounds"][0]["prompt"] == PROMPT
    assert "[regenerate] r: prompt revision failed, stopping this case: endpoint down" in capsys.readouterr().out
