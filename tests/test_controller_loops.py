"""The regeneration and inpainting loops end to end: the real tiny LEGION (legion.infer.Analyzer on a
make_tiny checkpoint), real diffusers pipelines built from tiny random configs, the tiny CLIP scorer.

A random tiny LEGION almost never emits [SEG], so to exercise the "artifact found" branches its
language head is steered (a forward hook on lm_head, as in benchmarks/fullsize_cpu_smoke.py) to
produce a chosen answer; the masks, records and RLE still come from the real model's SAM decoder.
"""

import contextlib
import json

import numpy as np
import pytest
from PIL import Image

from legion.controller.cases import Case, CaseWriter
from legion.controller.inpaint import InpaintConfig, dilate_mask, inpaint_case
from legion.controller.prompt_reviser import TemplateReviser
from legion.controller.regenerate import RegenerateConfig, regenerate_case, run_regeneration
from legion.controller.scoring import ClipScorer
from legion.model import conversation as conv

FOUND = "The " + conv.tag_phrase("left hand") + " has six fingers."
NOTHING = "The image looks natural."


@pytest.fixture(scope="module")
def analyzer(tiny_model_dir):
    from legion.infer import Analyzer, AnalyzerConfig

    return Analyzer.from_config(
        AnalyzerConfig(
            model_path=str(tiny_model_dir), device="cpu", sam_input_size=None, max_new_tokens=24, dtype="float32"
        )
    )


@pytest.fixture(scope="module")
def scorer():
    return ClipScorer.tiny(seed=0)


@contextlib.contextmanager
def steered(analyzer, answer: str):
    """Make the tiny LEGION answer `answer` (then </s>) to every image."""
    ids = analyzer.tokenizer(answer, add_special_tokens=False).input_ids + [analyzer.tokenizer.eos_token_id]
    state = {"step": 0}
    model = analyzer.model
    original = model.generate_grounded

    def generate_grounded(*args, **kwargs):
        state["step"] = 0
        return original(*args, **kwargs)

    def force(_module, _inputs, logits):
        step = state["step"]
        state["step"] += 1
        if step < len(ids):
            logits = logits.clone()
            last = logits[:, -1] if logits.dim() == 3 else logits
            last[:, ids[step]] = last.max() + 1e4
        return logits

    hook = model.lm_head.register_forward_hook(force)
    model.generate_grounded = generate_grounded
    try:
        yield
    finally:
        hook.remove()
        del model.generate_grounded


def _load_png(path):
    return np.asarray(Image.open(path).convert("RGB"))


def test_regeneration_revises_from_the_explanation_and_keeps_the_best(analyzer, scorer, text2img, tmp_path):
    cfg = RegenerateConfig(max_rounds=3, patience=0, stop_on_clean=True)
    cfg.generator.steps = 2
    case = Case("c1", "a woman waving")
    with steered(analyzer, FOUND):
        summary = regenerate_case(
            case, None, analyzer, text2img, TemplateReviser(), scorer, cfg, CaseWriter(tmp_path, "c1")
        )
    rounds = summary["rounds"]
    assert len(rounds) == 3 and summary["stop_reason"] == "max_rounds"
    assert rounds[0]["prompt"] == case.prompt and rounds[0]["phrases"] == ["left hand"]
    revised = "a woman waving, with natural, correct and realistic left hand"
    assert rounds[1]["prompt"] == revised and rounds[2]["prompt"] == revised
    for r in rounds:
        folder = tmp_path / "cases" / "c1" / f"round_{r['round']:02d}"
        assert (folder / "prompt.txt").read_text().strip() == r["prompt"]
        analysis = json.loads((folder / "analysis.json").read_text())
        assert analysis["record"]["verdict"] == "fake" and len(analysis["record"]["masks"]) == 1
        assert r["has_artifact"] and _load_png(folder / "mask_union.png").max() == 255
        # every round is scored against the ORIGINAL prompt, on the image that was saved
        assert r["score"] == pytest.approx(scorer(_load_png(folder / "image.png"), case.prompt), abs=1e-5)
    # a different prompt, same seed: a different image; the same prompt again: the same image
    images = [_load_png(tmp_path / r["image"]) for r in rounds]
    assert not np.array_equal(images[0], images[1]) and np.array_equal(images[1], images[2])
    scores = [r["score"] for r in rounds]
    assert summary["best_round"] == int(np.argmax(scores)) and summary["post_score"] == max(scores)
    assert summary["pre_score"] == scores[0]


def test_regeneration_stops_when_legion_finds_nothing(analyzer, scorer, text2img, tmp_path):
    start = np.random.RandomState(3).randint(0, 256, (40, 52, 3), dtype=np.uint8)
    cfg = RegenerateConfig(max_rounds=3)
    cfg.generator.steps = 2
    with steered(analyzer, NOTHING):
        summary = regenerate_case(
            Case("c2", "a cat"), start, analyzer, text2img, TemplateReviser(), scorer, cfg, CaseWriter(tmp_path, "c2")
        )
    assert summary["stop_reason"] == "no_artifact" and summary["num_rounds"] == 1
    (only,) = summary["rounds"]
    assert only["generated"] is False and not only["has_artifact"] and only["phrases"] == []
    assert np.array_equal(_load_png(tmp_path / only["image"]), start)  # the starting image is round 0
    assert summary["post_score"] == summary["pre_score"]


def test_regeneration_run_writes_summary_scores_and_page(analyzer, scorer, text2img, tmp_path):
    cfg = RegenerateConfig(max_rounds=3)
    cfg.generator.steps = 2
    with steered(analyzer, NOTHING):
        summaries, aggregate = run_regeneration(
            [Case("a", "a red car"), Case("b", "a blue boat")],
            analyzer,
            text2img,
            TemplateReviser(),
            scorer,
            cfg,
            tmp_path,
        )
    assert [s["stop_reason"] for s in summaries] == ["no_artifact", "no_artifact"]
    lines = (tmp_path / "summary.jsonl").read_text().splitlines()
    assert [json.loads(line)["case_id"] for line in lines] == ["a", "b"]
    saved = json.loads((tmp_path / "scores.json").read_text())
    assert saved["n"] == 2 and saved["mean_of_ratios"] == 0.0 and saved["ratio_of_means"] == 0.0
    assert saved["pre_mean"] == pytest.approx(np.mean([s["pre_score"] for s in summaries]))
    page = (tmp_path / "index.html").read_text()
    assert "cases/a/round_00/image.png" in page and "cases/b/round_00/mask_union.png" in page


def test_regeneration_patience_stops_on_a_score_that_does_not_improve(analyzer, scorer, text2img, tmp_path):
    cfg = RegenerateConfig(max_rounds=4, patience=1)
    cfg.generator.steps = 2
    with steered(analyzer, FOUND):
        s = regenerate_case(
            Case("p", "a red car"), None, analyzer, text2img, TemplateReviser(), scorer, cfg, CaseWriter(tmp_path, "p")
        )
    scores = [r["score"] for r in s["rounds"]]
    # rounds 2+ repeat round 1's prompt (the template reviser adds the same flags once), so the
    # loop must stop at round 1 (no better than round 0) or at round 2 (no better than round 1)
    assert len(scores) == (2 if scores[1] <= scores[0] else 3) and s["stop_reason"] == "no_improvement"
    assert s["best_round"] == int(np.argmax(scores))


def test_inpainting_masks_dilates_reanalyses_and_restores_size(analyzer, scorer, inpainter, tmp_path):
    image = np.random.RandomState(5).randint(0, 256, (40, 52, 3), dtype=np.uint8)
    cfg = InpaintConfig(max_iter=2, patience=0)
    cfg.inpainter.size, cfg.inpainter.steps = 32, 2
    cfg.dilation.kernel, cfg.dilation.iterations = 3, 1
    case = Case("i1", "a bowl of fruit", image_path=None)
    with steered(analyzer, FOUND):
        summary = inpaint_case(case, image, analyzer, inpainter, scorer, cfg, CaseWriter(tmp_path, "i1"))
    rounds = summary["rounds"]
    assert len(rounds) == 3 and summary["stop_reason"] == "max_iter"
    folders = [tmp_path / "cases" / "i1" / f"round_{k:02d}" for k in range(3)]
    assert np.array_equal(_load_png(folders[0] / "image.png"), image) and not (folders[0] / "mask_inpaint.png").exists()
    for k in (1, 2):
        previous_union = np.asarray(Image.open(folders[k - 1] / "mask_union.png")) > 0
        used = np.asarray(Image.open(folders[k] / "mask_inpaint.png")) > 0
        assert np.array_equal(used, dilate_mask(previous_union, 3, 1) > 0)  # the mask of the previous round
        out = _load_png(folders[k] / "image.png")
        assert out.shape == image.shape  # restored to the original size
        assert not np.array_equal(out, _load_png(folders[k - 1] / "image.png"))
        assert rounds[k]["score"] == pytest.approx(scorer(out, case.prompt), abs=1e-5)
    assert summary["best_round"] == int(np.argmax([r["score"] for r in rounds]))


def test_inpainting_stops_without_a_mask(analyzer, scorer, inpainter, tmp_path):
    image = np.random.RandomState(6).randint(0, 256, (40, 52, 3), dtype=np.uint8)
    cfg = InpaintConfig(max_iter=3)
    cfg.inpainter.size, cfg.inpainter.steps = 32, 2
    with steered(analyzer, NOTHING):
        summary = inpaint_case(
            Case("i2", "a tree"), image, analyzer, inpainter, scorer, cfg, CaseWriter(tmp_path, "i2")
        )
    assert summary["num_rounds"] == 1 and summary["stop_reason"] == "no_artifact"


def test_regeneration_keeps_round_0_when_the_reviser_fails(analyzer, scorer, text2img, tmp_path):
    from legion.controller.prompt_reviser import OpenAIChatReviser
    from tests.test_controller_reviser import FakeChatServer

    start = np.random.RandomState(4).randint(0, 256, (32, 32, 3), dtype=np.uint8)
    cfg = RegenerateConfig(max_rounds=3)
    with FakeChatServer([(401, {"error": "bad key"})]) as server, steered(analyzer, FOUND):
        reviser = OpenAIChatReviser(server.base_url, "k", "m", retries=0)
        summary = regenerate_case(
            Case("r", "a cat"), start, analyzer, text2img, reviser, scorer, cfg, CaseWriter(tmp_path, "r")
        )
    assert summary["stop_reason"] == "reviser_error" and summary["num_rounds"] == 1
    assert summary["rounds"][0]["has_artifact"] and len(server.requests) == 1
