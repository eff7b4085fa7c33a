"""Ground truth for evaluation: SynthScars files -> per-image items; RLE rasterization = training's."""

import json

import numpy as np
import pytest
from PIL import Image

from legion.data.synthscars import rasterize_polygons
from legion.eval.ground_truth import GroundTruthItem, load_ground_truth, match_predictions, polygons_to_rle
from legion.utils.rle import rle_to_mask

PREFIX = "Upon examining the image. I have found: "
MARKER = "\nTo elaborate, I have found the following artifacts. "


def test_polygons_to_rle_equals_training_rasterizer():
    rng = np.random.default_rng(0)
    h, w = 37, 53
    for trial in range(40):
        polys = []
        for _ in range(rng.integers(1, 4)):
            n = rng.integers(3, 9)
            lo = -15 if trial % 3 == 0 else 0  # some polygons leave the image on the top/left
            xy = np.stack([rng.uniform(lo, w + 10, n), rng.uniform(lo, h + 10, n)], 1)
            polys.append(xy.ravel().tolist())
        np.testing.assert_array_equal(rle_to_mask(polygons_to_rle(polys, h, w)), rasterize_polygons(polys, h, w))


def _write_synthscars(root, records, sizes):
    (root / "test" / "annotations").mkdir(parents=True)
    (root / "test" / "images").mkdir(parents=True)
    for name, (h, w) in sizes.items():
        Image.fromarray(np.zeros((h, w, 3), np.uint8)).save(root / "test" / "images" / name)
    (root / "test" / "annotations" / "test.json").write_text(json.dumps(records))


def _record(rid, name, refs):
    caption = PREFIX + "Summary." + MARKER + "".join(f"{s}:{e}" for s, e, _ in refs)
    return {
        rid: {
            "img_file_name": name,
            "caption": caption,
            "refs": [{"sentence": s, "explanation": e, "bbox": None, "segmentation": p} for s, e, p in refs],
        }
    }


def test_load_synthscars_unions_records_of_the_same_file(tmp_path):
    box = lambda x0, y0, x1, y1: [[x0, y0, x1, y0, x1, y1, x0, y1]]
    records = [
        _record("1", "a.png", [("left ear", "is bent.", box(0, 0, 10, 10))]),
        _record("2", "/cluster/path/a.png", [("hand", "has six fingers.", box(20, 20, 30, 30))]),  # same file
        _record("3", "b.png", []),  # no artifacts
    ]
    _write_synthscars(tmp_path, records, {"a.png": (40, 50), "b.png": (8, 9)})
    gt = load_ground_truth(tmp_path, "synthscars", split="test", raster="coco")
    assert sorted(gt) == ["a.png", "b.png"]
    a = gt["a.png"]
    assert a.size == (40, 50) and len(a.phrase_polygons) == 2
    mask = rle_to_mask(a.mask_rle(a.size))
    expected = rasterize_polygons(box(0, 0, 10, 10) + box(20, 20, 30, 30), 40, 50)
    np.testing.assert_array_equal(mask, expected)
    # the default is the paper's drawing: integer box corners included, 11 x 11 px per box
    paper = load_ground_truth(tmp_path, "synthscars", split="test")["a.png"]
    paper_mask = rle_to_mask(paper.mask_rle(paper.size))
    assert paper_mask.sum() == 2 * 11 * 11 and (paper_mask >= mask).all()
    assert a.reference_text.startswith(
        "Upon examining the image. I have found: Summary. To elaborate"
    )  # whitespace normalised
    assert rle_to_mask(gt["b.png"].mask_rle((8, 9))).sum() == 0
    # annotation file given directly: the images folder next to annotations/ is found
    gt2 = load_ground_truth(tmp_path / "test" / "annotations" / "test.json", "synthscars")
    assert gt2["a.png"].size == (40, 50)


def test_escaping_names_get_no_size_and_missing_images_fall_back(tmp_path):
    records = [_record("1", "../../etc/passwd.png", []), _record("2", "gone.png", []), _record("3", "sub/s.png", [])]
    _write_synthscars(tmp_path, records, {})
    (tmp_path / "test" / "images" / "sub").mkdir()
    Image.fromarray(np.zeros((6, 7, 3), np.uint8)).save(tmp_path / "test" / "images" / "sub" / "s.png")
    gt = load_ground_truth(tmp_path, "synthscars")
    assert gt["passwd.png"].size is None and gt["gone.png"].size is None
    assert gt["s.png"].size == (6, 7)  # relative sub-folder names follow the data loader's rule
    assert gt["gone.png"].resolved_size(fallback=(5, 6)) == (5, 6)
    with pytest.raises(ValueError, match="size unknown"):
        gt["gone.png"].resolved_size()


def test_shared_sample_annotation_loads(synthscars_sample_path, tmp_path):
    gt = load_ground_truth(synthscars_sample_path, "synthscars", image_dir=tmp_path)
    assert len(gt) > 50
    item = next(iter(gt.values()))
    assert item.reference_text.startswith(PREFIX.strip()) and item.phrase_polygons is not None


def test_match_predictions_exact_then_unique_basename():
    m = match_predictions(
        [{"image": "x/a.png"}, {"image": "a.png"}, {"image": "q/b.png"}, {"image": "c.png"}],
        {n: GroundTruthItem(n) for n in ["a.png", "b.png", "d/b.png", "e.png"]},
    )
    assert set(m.by_name) == {"a.png"} and m.duplicates == ["a.png"]
    assert "q/b.png" in m.extra and "c.png" in m.extra  # b.png is ambiguous, c.png unknown
    assert m.missing == ["b.png", "d/b.png", "e.png"]


def test_unknown_dataset():
    with pytest.raises(ValueError, match="unknown dataset"):
        load_ground_truth(".", "coco")
    with pytest.raises(ValueError, match="rasterization"):
        load_ground_truth(".", "synthscars", raster="opencv")


def test_toyscars_perfect_predictions_score_100_with_breakdowns(toy_data_dir):
    """ToyScars carries content types and artifact categories: perfect predictions built from its
    own polygons score 100 everywhere, and both breakdowns appear."""
    from legion.data.synthscars import find_annotation_file, load_annotations
    from legion.eval.explanation import evaluate_explanations
    from legion.eval.localization import evaluate_localization
    from legion.utils.rle import mask_to_rle

    gt = load_ground_truth(toy_data_dir, "synthscars", split="test", raster="coco")  # the raster of the masks below
    records, _ = load_annotations(find_annotation_file(toy_data_dir, "test"))
    assert len(gt) == len({r.img_file_name for r in records}) > 0
    preds = []
    for name, item in gt.items():
        h, w = item.size
        masks = [mask_to_rle(rasterize_polygons(p, h, w)) for p in item.phrase_polygons]
        preds.append(
            {
                "image": name,
                "verdict": "fake",
                "masks": masks,
                "union_mask": item.mask_rle((h, w)),
                "phrases": list(item.phrase_texts),
                "explanation": item.reference_text,
            }
        )
    m = evaluate_localization(preds, gt).metrics
    assert m["protocol"]["images_scored_per_mask"] == sum(bool(i.phrase_texts) for i in gt.values()) > 0
    assert m["overall"]["f1"] == pytest.approx(100.0) and m["overall"]["miou"] == pytest.approx(100.0, abs=1e-4)
    assert m["overall"]["giou"] == pytest.approx(100.0, abs=1e-3)
    assert m["by_content_type"] and m["by_artifact_category"]
    assert sum(v["num_images"] for v in m["by_content_type"].values()) == len(gt)
    e = evaluate_explanations(preds, gt).metrics
    assert e["overall"]["rouge_l"] == pytest.approx(100.0)


def test_reference_layout_predictions(tmp_path):
    from legion.eval.ground_truth import read_predictions
    from legion.eval.localization import evaluate_localization
    from legion.utils.rle import mask_to_rle

    mask = np.zeros((20, 30), np.uint8)
    mask[2:8, 3:9] = 255
    d = tmp_path / "out" / "a.png"
    d.mkdir(parents=True)
    Image.fromarray(mask, mode="L").save(d / "mask.png")
    (d / "explanation.json").write_text(json.dumps({"imgs/a.png": "The ear is bent."}))
    (tmp_path / "out" / "b.png").mkdir()
    (tmp_path / "out" / "b.png" / "explanation.json").write_text(json.dumps({"imgs/b.png": ""}))
    recs = {r.image: r for r in read_predictions(tmp_path / "out")}
    assert recs["a.png"].explanation == "The ear is bent." and recs["b.png"].masks == []
    assert recs["a.png"].union_mask is not None and recs["b.png"].union_mask is None
    gt = {
        "a.png": GroundTruthItem("a.png", union_rle=mask_to_rle(mask > 0)),
        "b.png": GroundTruthItem("b.png", union_rle=mask_to_rle(np.zeros((5, 5)))),
    }
    m = evaluate_localization(list(recs.values()), gt).metrics["overall"]
    assert m["f1"] == pytest.approx(100.0) and m["num_missing"] == 0
    with pytest.raises(ValueError, match="reference layout"):
        read_predictions(tmp_path / "out" / "b.png")


def test_loki_ground_truth_boxes_and_reference_text(tmp_path):
    from legion.data.benchmarks import loki_box_mask

    items = [
        {
            "image_path": "loki/imgs/x.jpg",
            "problems": {
                "regional": [{"region": [2, 3, 10.7, 5.2], "desc": "d"}],
                "global": [{"desc": "The  hand is wrong."}],
            },
        },
        {"image_path": "other/x.jpg", "problems": {"regional": [{"region": [20, 20, 100, 100]}]}},  # same file
        {"image_path": "loki/imgs/y.jpg", "problems": {"regional": [], "global": [{"desc": "fine"}]}},
    ]
    ann = tmp_path / "loki.json"
    ann.write_text(json.dumps(items), encoding="utf-16")
    imgs = tmp_path / "imgs"
    imgs.mkdir()
    Image.fromarray(np.zeros((30, 40, 3), np.uint8)).save(imgs / "x.jpg")
    gt = load_ground_truth(ann, "loki", image_dir=imgs)
    assert sorted(gt) == ["x.jpg", "y.jpg"]
    x = gt["x.jpg"]
    assert x.size == (30, 40) and x.reference_text == "The hand is wrong."
    expected = loki_box_mask([[2, 3, 10.7, 5.2], [20, 20, 100, 100]], 30, 40)
    np.testing.assert_array_equal(rle_to_mask(x.mask_rle(x.size)), expected)
    assert expected[3:9, 2:13].all() and expected.sum() == 6 * 11 + 10 * 20  # inclusive corners, clipped
    y = gt["y.jpg"]
    assert y.size is None and rle_to_mask(y.mask_rle(y.resolved_size((7, 9)))).sum() == 0


def test_richhf_ground_truth_from_heatmaps(tmp_path):
    raw, heat = tmp_path / "richhf" / "raw_imgs", tmp_path / "richhf" / "heatmaps"
    raw.mkdir(parents=True)
    heat.mkdir(parents=True)
    hm = np.zeros((16, 24), np.uint8)
    hm[4:8, 5:10] = 1  # any value > 0 is artifact
    hm[0, 0] = 200
    for name in ("a.png", "b.png"):
        Image.fromarray(np.zeros((16, 24, 3), np.uint8)).save(raw / name)
    Image.fromarray(hm, mode="L").save(heat / "a.png")
    with pytest.warns(UserWarning, match="no heatmap"):
        gt = load_ground_truth(raw, "richhf")
    assert list(gt) == ["a.png"]
    np.testing.assert_array_equal(rle_to_mask(gt["a.png"].union_rle), (hm > 0).astype(np.uint8))


def test_paper_raster_truncates_vertices_and_fills_edges():
    from legion.eval.ground_truth import paper_polygons_to_rle

    # vertices 1.9 .. 5.9 truncate to 1 .. 5; fillPoly covers the edges: rows and columns 1..5 inclusive
    mask = rle_to_mask(paper_polygons_to_rle([[1.9, 1.9, 5.9, 1.9, 5.9, 5.9, 1.9, 5.9]], 8, 8))
    expected = np.zeros((8, 8), np.uint8)
    expected[1:6, 1:6] = 1
    np.testing.assert_array_equal(mask, expected)
    # toward zero, not floor: -0.9 -> 0; drawing is clipped to the image; union of several polygons
    mask = rle_to_mask(paper_polygons_to_rle([[-0.9, -0.9, 2.5, -0.9, 2.5, 2.5, -0.9, 2.5], [6, 6, 7, 6, 7, 7]], 8, 8))
    assert mask[:3, :3].all() and mask.sum() == 9 + 3


def test_paper_raster_is_a_few_percent_larger_on_the_real_sample(synthscars_sample_path):
    from legion.eval.ground_truth import paper_polygons_to_rle
    from tests.fixtures_data import record_canvas_size

    ratios, ious = [], []
    for entry in json.loads(synthscars_sample_path.read_text()):
        body = next(iter(entry.values()))
        h, w = record_canvas_size(body)
        for ref in body["refs"]:
            paper = rle_to_mask(paper_polygons_to_rle(ref["segmentation"], h, w)).astype(bool)
            coco = rle_to_mask(polygons_to_rle(ref["segmentation"], h, w)).astype(bool)
            ratios.append(paper.sum() / coco.sum())
            ious.append((paper & coco).sum() / (paper | coco).sum())
    assert len(ratios) == 260 and all(r >= 1 for r in ratios)
    # measured: area ratio mean 1.076 (median 1.056), IoU mean 0.932 (median 0.947)
    assert 1.03 < np.mean(ratios) < 1.12 and 0.9 < np.median(ious) < 0.98


def test_loki_boxes_paper_vs_coco(tmp_path):
    from legion.eval.ground_truth import GroundTruthItem

    paper = GroundTruthItem("l.png", size=(10, 10), boxes=[[1.5, 2.5, 3.0, 2.0]])
    coco = GroundTruthItem("l.png", size=(10, 10), boxes=[[1.5, 2.5, 3.0, 2.0]], raster="coco")
    # paper: x 1..4, y 2..4 inclusive (int truncation) = 4 x 3 = 12 px; coco: area coverage of [1.5, 4.5) x [2.5, 4.5)
    assert rle_to_mask(paper.mask_rle((10, 10))).sum() == 12
    assert rle_to_mask(coco.mask_rle((10, 10))).sum() == 6  # pixels 2..4 x 3..4
