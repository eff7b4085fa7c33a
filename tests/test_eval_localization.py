"""Localization metrics: the worked examples of docs/metrics.md §4 are the fixtures."""

import dataclasses
import json

import numpy as np
import pytest

from legion.eval.ground_truth import GroundTruthItem, polygons_to_rle
from legion.eval.localization import (
    evaluate_localization,
    fg_f1,
    fg_iou,
    legion_f1,
    legion_miou,
    lisa_mask_iou,
    pixel_counts,
    score_image,
    summarize,
)
from legion.record import PredictionRecord
from legion.utils.rle import mask_to_rle, rle_to_mask


def rows(a, b):
    m = np.zeros((100, 100), dtype=np.uint8)
    m[a:b] = 1
    return m


EMPTY, GT10, ALL = np.zeros((100, 100), np.uint8), rows(0, 10), np.ones((100, 100), np.uint8)
# case: (pred, gt, IoU_bg, IoU_fg, mIoU, F1) from metrics.md §4
CASES = {
    "A": (None, GT10, 0.899999999910, 0.0, 0.449999999955, 0.0),
    "B": (None, EMPTY, 0.999999999900, 0.0, 0.499999999950, 1.0),
    "C": (GT10, GT10, 0.999999999889, 0.999999999000, 0.999999999444, 1.0),
    "D": (ALL, GT10, 0.0, 0.099999999990, 0.049999999995, 2 / 11),
    "E": (rows(5, 15), GT10, 0.894736842011, 0.333333333111, 0.614035087561, 0.5),
    "F": (GT10, EMPTY, 0.899999999910, 0.0, 0.449999999955, 0.0),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_worked_examples_legion_protocol(case):
    pred, gt, iou_bg, iou_fg, miou, f1 = CASES[case]
    tp, fp, fn, tn = pixel_counts(pred, gt)
    assert tp + fp + fn + tn == 10_000
    assert tn / (tn + fp + fn + 1e-6) == pytest.approx(iou_bg, abs=1e-11)
    assert tp / (tp + fp + fn + 1e-6) == pytest.approx(iou_fg, abs=1e-11)
    assert float(legion_miou(tp, fp, fn, tn)) == pytest.approx(miou, abs=1e-11)
    assert float(legion_f1(tp, fp, fn)) == pytest.approx(f1, abs=1e-12)


def _item(name, gt):
    return GroundTruthItem(name=name, union_rle=mask_to_rle(gt))


def _record(name, pred):
    if pred is None:
        return PredictionRecord(image=name, verdict="fake")
    return PredictionRecord(
        image=name, verdict="fake", masks=[mask_to_rle(pred)], union_mask=mask_to_rle(pred), width=100, height=100
    )


@pytest.mark.parametrize("case", sorted(CASES))
def test_rle_path_equals_dense_counts(case):
    pred, gt, *_ = CASES[case]
    s = score_image(_item("x.png", gt), _record("x.png", pred))
    assert (s.tp, s.fp, s.fn, s.tn) == pixel_counts(pred, gt)


def test_aggregate_images_A_and_E():
    gt = {"a.png": _item("a.png", GT10), "e.png": _item("e.png", GT10)}
    preds = [_record("a.png", None), _record("e.png", rows(5, 15))]
    m = evaluate_localization(preds, gt, both_empty="artiagent").metrics["overall"]
    assert m["fg_iou"] == pytest.approx(100 * (0 + 1 / 3) / 2, abs=1e-9)
    assert m["f1"] == pytest.approx(25.0, abs=1e-9)
    assert m["fg_f1"] == pytest.approx(25.0, abs=1e-9)
    assert m["global_fg_iou"] == pytest.approx(20.0, abs=1e-9)
    assert m["global_fg_f1"] == pytest.approx(100 / 3, abs=1e-9)
    assert m["miou"] == pytest.approx(100 * 0.532017543758, abs=1e-8)
    assert m["giou"] == pytest.approx(100 * 0.1666666656, abs=1e-7)
    assert m["ciou"] == pytest.approx(20.0, abs=1e-7)
    assert (m["num_images"], m["num_missing"]) == (2, 0)


def test_both_empty_conventions_case_B():
    tp, fp, fn, tn = pixel_counts(None, EMPTY)
    assert float(fg_iou(tp, fp, fn, 1.0)) == 1.0 and float(fg_f1(tp, fp, fn, 0.0)) == 0.0  # ArtiAgent
    assert float(legion_f1(tp, fp, fn)) == 1.0
    assert float(legion_miou(tp, fp, fn, tn)) == pytest.approx(0.49999999995, abs=1e-11)
    assert float(fg_iou(tp, fp, fn, 0.0)) == 0.0  # LEGION fg-only
    assert float(lisa_mask_iou(0, 0)) == 1.0
    gt = {"b.png": _item("b.png", EMPTY), "e.png": _item("e.png", GT10)}
    preds = [_record("b.png", None), _record("e.png", rows(5, 15))]
    by = {c: evaluate_localization(preds, gt, both_empty=c).metrics for c in ("artiagent", "one", "zero", "skip")}
    assert by["artiagent"]["overall"]["fg_iou"] == pytest.approx(100 * (1 + 1 / 3) / 2)
    assert by["artiagent"]["overall"]["fg_f1"] == pytest.approx(25.0)
    assert by["one"]["overall"]["fg_f1"] == pytest.approx(75.0)
    assert by["zero"]["overall"]["fg_iou"] == pytest.approx(100 / 6)
    assert by["skip"]["overall"]["fg_iou"] == pytest.approx(100 / 3)
    assert by["skip"]["protocol"]["fg_both_empty"] == "skip"
    assert by["artiagent"]["protocol"]["fg_both_empty_values"] == {"fg_iou": 1.0, "fg_f1": 0.0}
    # the LEGION protocol does not depend on the convention
    assert len({round(m["overall"]["miou"], 9) for m in by.values()}) == 1


def test_missing_real_error_and_extra_predictions():
    gt = {n: _item(n, GT10) for n in ("a.png", "b.png", "c.png", "d.png")}
    preds = [
        _record("a.png", GT10),
        dataclasses.replace(_record("b.png", GT10), verdict="real"),  # real verdict = empty prediction
        dataclasses.replace(_record("c.png", GT10), verdict="error", error="boom"),
        _record("zzz.png", GT10),  # no ground truth
    ]
    res = evaluate_localization(preds, gt)
    m = res.metrics
    assert m["overall"]["num_images"] == 4 and m["overall"]["num_missing"] == 1 and m["overall"]["num_errors"] == 1
    assert m["missing_images"] == ["d.png"] and m["extra_predictions"] == ["zzz.png"]
    assert m["overall"]["f1"] == pytest.approx(25.0)  # only a.png is found
    per = {r["image"]: r for r in res.per_image_rows()}
    assert per["d.png"]["missing"] and per["d.png"]["pred_area"] == 0 and per["d.png"]["gt_area"] == 1000
    json.dumps(m)  # serialisable


def test_prediction_matched_by_unique_basename():
    gt = {"x.png": _item("x.png", GT10)}
    res = evaluate_localization([_record("sub/dir/x.png", GT10)], gt)
    assert res.metrics["overall"]["f1"] == pytest.approx(100.0) and res.metrics["missing_images"] == []


def test_size_mismatch_raises():
    gt = {"x.png": _item("x.png", GT10)}
    with pytest.raises(ValueError, match="size"):
        evaluate_localization([_record("x.png", np.ones((50, 100), np.uint8))], gt)


def test_union_of_masks_when_union_mask_absent():
    rec = PredictionRecord(image="x.png", verdict="fake", masks=[mask_to_rle(rows(0, 5)), mask_to_rle(rows(5, 10))])
    s = score_image(_item("x.png", GT10), rec)
    assert (s.tp, s.fp, s.fn) == (1000, 0, 0)


def test_breakdowns_by_content_type_and_category():
    gt = {
        "h.png": GroundTruthItem(
            "h.png", union_rle=mask_to_rle(GT10), content_type="Human", artifact_category=["Structure", "Physics"]
        ),
        "o.png": GroundTruthItem(
            "o.png", union_rle=mask_to_rle(GT10), content_type="Object", artifact_category="Structure"
        ),
    }
    preds = [_record("h.png", GT10), _record("o.png", None)]
    m = evaluate_localization(preds, gt).metrics
    assert m["by_content_type"]["Human"]["f1"] == pytest.approx(100.0)
    assert m["by_content_type"]["Object"]["f1"] == pytest.approx(0.0)
    assert m["by_artifact_category"]["Structure"]["num_images"] == 2
    assert m["by_artifact_category"]["Physics"]["num_images"] == 1


def test_mask_pairing_per_phrase_ground_truth():
    # two GT artifacts given as polygons; the prediction hits "left ear" exactly and misses "tail"
    polys = [[[0, 0, 50, 0, 50, 10, 0, 10]], [[60, 60, 80, 60, 80, 80, 60, 80]]]
    item = GroundTruthItem(
        "p.png", size=(100, 100), phrase_polygons=polys, phrase_texts=["Left ear", "tail"], raster="coco"
    )
    g0 = polygons_to_rle(polys[0], 100, 100)
    miss = mask_to_rle(rows(90, 100))
    in_order = {"image": "p.png", "verdict": "fake", "phrases": ["left  EAR", "tail"], "masks": [g0, miss]}
    swapped = {"image": "p.png", "verdict": "fake", "phrases": ["tail", "left ear"], "masks": [miss, g0]}
    free_text = {"image": "p.png", "verdict": "fake", "phrases": ["the ear", "tail"], "masks": [g0, miss]}

    def run(pred, pairing):
        return evaluate_localization([pred], {"p.png": item}, mask_pairing=pairing).metrics

    for pred in (in_order, swapped):  # auto pairs by phrase text, whatever the order
        m = run(pred, "auto")
        assert m["protocol"]["images_scored_per_mask"] == 1 and m["overall"]["num_masks"] == 2
        assert m["overall"]["giou"] == pytest.approx(50.0, abs=1e-3)  # mean(1, 0)
        assert m["overall"]["ciou"] == pytest.approx(100 * 500 / (500 + 400 + 1000), abs=1e-6)
    # ordered pairs by position: the swapped prediction then scores 0 on both masks
    assert run(swapped, "ordered")["overall"]["giou"] == pytest.approx(0.0)
    # phrases that are not GT sentences: auto falls back to the union
    for m in (run(free_text, "auto"), run(in_order, "union")):
        assert m["protocol"]["images_scored_per_mask"] == 0 and m["overall"]["num_masks"] == 1
        assert 0 < m["overall"]["giou"] < 100
    with pytest.raises(ValueError, match="mask_pairing"):
        run(in_order, "hungarian")


def test_polygons_to_rle_clips_and_skips_degenerate():
    from legion.utils.rle import rle_area, rle_to_mask

    r = polygons_to_rle([[-10, -10, 200, -10, 200, 200, -10, 200], [1, 1, 2, 2]], 20, 30)
    assert rle_to_mask(r).shape == (20, 30) and rle_area(r) == 600
    assert rle_area(polygons_to_rle([], 5, 5)) == 0


def test_multiprocessing_matches_serial():
    rng = np.random.default_rng(0)
    gt, preds = {}, []
    for i in range(80):
        g = (rng.random((40, 30)) < 0.2).astype(np.uint8)
        p = (rng.random((40, 30)) < 0.2).astype(np.uint8)
        gt[f"{i}.png"] = _item(f"{i}.png", g)
        preds.append(_record(f"{i}.png", p))
    a = evaluate_localization(preds, gt, workers=1).metrics["overall"]
    b = evaluate_localization(preds, gt, workers=2).metrics["overall"]
    assert a == b
    # against the dense formulas computed here, image by image
    dense_miou = np.mean(
        [legion_miou(*pixel_counts(rle_to_mask(r.union_mask), rle_to_mask(gt[r.image].union_rle))) for r in preds]
    )
    assert a["miou"] == pytest.approx(100 * dense_miou, abs=1e-9)


def test_images_of_unknown_size_are_reported_not_scored():
    gt = {
        "a.png": GroundTruthItem("a.png", phrase_polygons=[[[0, 0, 5, 0, 5, 5]]]),  # no size, no prediction
        "b.png": GroundTruthItem("b.png", phrase_polygons=[[[0, 0, 50, 0, 50, 10, 0, 10]]]),
    }
    pred = {"image": "b.png", "verdict": "fake", "width": 100, "height": 100, "masks": [mask_to_rle(rows(0, 10))]}
    with pytest.warns(UserWarning, match="no known size"):
        m = evaluate_localization([pred], gt).metrics
    assert m["unscorable_images"] == ["a.png"] and m["overall"]["num_images"] == 1
    assert m["missing_images"] == ["a.png"]


def test_summarize_empty_and_unknown_convention():
    s = summarize([])
    assert s["num_images"] == 0 and s["miou"] is None and s["giou"] is None
    with pytest.raises(ValueError, match="both-empty"):
        summarize([], both_empty="half")
