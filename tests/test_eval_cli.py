"""`legion eval ...` end to end on a generated SynthScars-layout fixture."""

import json

import numpy as np
import pytest
from PIL import Image

from legion.cli import main
from legion.data.synthscars import rasterize_polygons
from legion.eval.localization import legion_f1, legion_miou, pixel_counts
from legion.utils.rle import mask_to_rle

PREFIX = "Upon examining the image. I have found: "
MARKER = "\nTo elaborate, I have found the following artifacts. "
H, W = 60, 80


def box(x0, y0, x1, y1):
    return [x0, y0, x1, y0, x1, y1, x0, y1]


@pytest.fixture
def run_inputs(tmp_path):
    """4 GT images (one without artifacts), predictions for 3 of them."""
    root = tmp_path / "SynthScars"
    (root / "test" / "annotations").mkdir(parents=True)
    (root / "test" / "images").mkdir(parents=True)
    gts = {
        "a.png": [box(0, 0, 20, 20)],
        "b.png": [box(10, 10, 50, 30), box(60, 40, 79, 59)],
        "c.png": [box(5, 5, 15, 15)],
        "d.png": [],
    }
    types = {"a.png": "human", "b.png": "object", "c.png": "human", "d.png": "scene"}
    records = []
    for i, (name, polys) in enumerate(gts.items()):
        Image.fromarray(np.zeros((H, W, 3), np.uint8)).save(root / "test" / "images" / name)
        refs = [
            {"sentence": f"part {k}", "explanation": "looks wrong.", "bbox": None, "segmentation": [p]}
            for k, p in enumerate(polys)
        ]
        caption = PREFIX + f"Image {name}." + MARKER + "".join(f"{r['sentence']}:{r['explanation']}" for r in refs)
        records.append({str(i): {"img_file_name": name, "caption": caption, "refs": refs, "content_type": types[name]}})
    (root / "test" / "annotations" / "test.json").write_text(json.dumps(records))

    preds = {"a.png": [box(0, 0, 20, 10)], "b.png": [box(10, 10, 50, 30)], "d.png": []}
    lines = []
    for name, polys in preds.items():
        masks = [mask_to_rle(rasterize_polygons([p], H, W)) for p in polys]
        union = mask_to_rle(rasterize_polygons(polys, H, W)) if polys else None
        lines.append(
            {
                "image": name,
                "width": W,
                "height": H,
                "verdict": "fake",
                "fake_prob": None,
                "explanation": f"Image {name}. part 0 looks wrong.",
                "phrases": [f"part {k}" for k in range(len(polys))],
                "masks": masks,
                "union_mask": union,
                "no_seg": not polys,
                "raw_text": "",
                "error": None,
            }
        )
    pred_path = tmp_path / "predictions.jsonl"
    pred_path.write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    return root, pred_path, gts, preds


def test_localization_command(run_inputs, tmp_path, capsys):
    root, pred_path, gts, preds = run_inputs
    out = tmp_path / "run1" / "synthscars"
    code = main(
        [
            "eval",
            "localization",
            "--pred",
            str(pred_path),
            "--gt",
            str(root),
            "--dataset",
            "synthscars",
            "--output-dir",
            str(out),
            "--workers",
            "1",
            "--gt-raster",
            "coco",
        ]
    )
    assert code == 0
    m = json.loads((out / "metrics.json").read_text())
    o = m["overall"]
    for key in (
        "miou",
        "f1",
        "fg_iou",
        "fg_f1",
        "global_fg_iou",
        "global_fg_f1",
        "giou",
        "ciou",
        "num_images",
        "num_missing",
    ):
        assert key in o
    assert o["num_images"] == 4 and o["num_missing"] == 1 and m["missing_images"] == ["c.png"]
    # recompute from dense masks, independently of the RLE path
    counts = [
        pixel_counts(rasterize_polygons(preds[n], H, W) if n in preds else None, rasterize_polygons(gts[n], H, W))
        for n in sorted(gts)
    ]
    assert o["miou"] == pytest.approx(100 * np.mean([legion_miou(*c) for c in counts]), abs=1e-9)
    assert o["f1"] == pytest.approx(100 * np.mean([legion_f1(*c[:3]) for c in counts]), abs=1e-9)
    assert 0 <= o["fg_iou"] <= 100 and m["protocol"]["fg_both_empty"] == "artiagent"
    assert m["protocol"]["gt_raster"] == "coco"
    assert set(m["by_content_type"]) == {"human", "object", "scene"}
    assert m["by_content_type"]["scene"]["f1"] == 100.0  # d.png: both empty
    rows = [json.loads(line) for line in (out / "per_image.jsonl").read_text().splitlines()]
    assert len(rows) == 4 and {r["image"] for r in rows} == set(gts)
    for f in ("category_bars.png", "iou_histogram.png", "table.md", "table.csv", "table.json"):
        assert (out / f).stat().st_size > 0
    table = (out / "table.md").read_text()
    assert "Human mIoU" in table and "SynthScars F1" in table
    assert "1 of 4 images had no prediction" in capsys.readouterr().out


def test_explanation_and_compare_with_paper(run_inputs, tmp_path, capsys):
    root, pred_path, *_ = run_inputs
    types = tmp_path / "types.json"
    types.write_text(json.dumps({"a.png": "Animal", "b.png": "Animal", "c.png": "Scene"}))
    (pred_path.parent / "infer_summary.json").write_text(json.dumps({"perturbation": {"kind": "jpeg", "quality": 50}}))
    out = tmp_path / "run1" / "synthscars_exp"
    assert (
        main(
            [
                "eval",
                "explanation",
                "--pred",
                str(pred_path),
                "--gt",
                str(root),
                "--dataset",
                "synthscars",
                "--output-dir",
                str(out),
                "--no-css",
                "--content-types",
                str(types),
            ]
        )
        == 0
    )
    m = json.loads((out / "metrics.json").read_text())
    assert m["kind"] == "explanation" and m["overall"]["num_images"] == 4 and m["overall"]["num_missing"] == 1
    assert 0 < m["overall"]["rouge_l"] < 100 and m["overall"]["css"] is None
    assert m["perturbation"] == [{"kind": "jpeg", "quality": 50}]  # from legion infer's summary
    assert m["by_content_type"]["Animal"]["num_images"] == 2  # --content-types overrides
    assert m["by_content_type"]["scene"]["num_images"] == 1  # d.png keeps the annotation's
    main(
        [
            "eval",
            "localization",
            "--pred",
            str(pred_path),
            "--gt",
            str(root),
            "--dataset",
            "synthscars",
            "--output-dir",
            str(tmp_path / "run1" / "synthscars"),
            "--no-plots",
        ]
    )
    capsys.readouterr()
    table_path = tmp_path / "cmp.csv"
    assert (
        main(
            [
                "eval",
                "compare",
                str(tmp_path / "run1"),
                "--kind",
                "localization",
                "--with-paper",
                "--format",
                "csv",
                "--output-dir",
                str(table_path),
            ]
        )
        == 0
    )
    lines = table_path.read_text().splitlines()
    header = lines[0].split(",")
    assert header[:4] == ["run", "perturbation", "Object mIoU", "Object F1"]
    legion = next(line for line in lines if line.startswith("paper: LEGION"))
    assert "54.62" in legion and "29.9" in legion
    assert lines[1].startswith("run1,jpeg:50,")
    assert main(["eval", "compare", str(tmp_path / "run1")]) == 0
    text = capsys.readouterr().out
    assert "## localization" in text and "## explanation" in text and "SynthScars ROUGE-L" in text


def test_detection_command_with_folder_gt(tmp_path):
    gt = tmp_path / "ufd"
    probs = {}
    for subset, n in (("progan", 2), ("crn", 2)):
        for label in ("0_real", "1_fake"):
            d = gt / subset / label
            d.mkdir(parents=True)
            for k in range(n):
                Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(d / f"{k}.png")
                probs[f"{subset}/{label}/{k}.png"] = (0.9 if label == "1_fake" else 0.1) if k == 0 else 0.6
    pred = tmp_path / "scores.jsonl"
    pred.write_text(
        "\n".join(json.dumps({"image": k, "fake_prob": v}) for k, v in probs.items() if k != "crn/0_real/1.png") + "\n"
    )
    out = tmp_path / "det"
    assert main(["eval", "detection", "--pred", str(pred), "--gt", str(gt), "--output-dir", str(out)]) == 0
    m = json.loads((out / "metrics.json").read_text())
    assert m["per_subset"]["progan"]["accuracy"] == 75.0  # fake 2/2, real 1/2
    assert m["per_subset"]["crn"]["accuracy"] == 100.0 and m["per_subset"]["crn"]["num_images"] == 3
    assert m["num_missing"] == 1 and m["groups"]["GANs"]["subsets"] == ["progan"]
    assert m["mean_accuracy"] == pytest.approx((75 + 100) / 2)


def test_bad_inputs_give_clear_errors(tmp_path, capsys):
    assert (
        main(
            [
                "eval",
                "localization",
                "--pred",
                str(tmp_path / "nope.jsonl"),
                "--gt",
                str(tmp_path),
                "--dataset",
                "synthscars",
                "--output-dir",
                str(tmp_path / "o"),
            ]
        )
        == 2
    )
    assert "no such file" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["eval", "localization", "--pred", "x", "--gt", "y", "--dataset", "coco", "--output-dir", "z"])
    assert main(["eval", "compare", str(tmp_path / "missing")]) == 2


def test_detection_from_detector_eval_output_and_its_metrics_json(tmp_path, capsys):
    """`legion cls-eval` writes predictions.jsonl with subset / is_fake / fake_prob (None when the
    image was unreadable) and a metrics.json with the metrics nested under "metrics"."""
    from legion.eval.detection import detection_metrics
    from legion.eval.report import compare

    recs = [
        {"image": "/d/progan/1_fake/0.png", "subset": "progan", "is_fake": True, "fake_prob": 0.8, "error": None},
        {"image": "/d/progan/0_real/0.png", "subset": "progan", "is_fake": False, "fake_prob": 0.7, "error": None},
        {"image": "/d/progan/0_real/1.png", "subset": "progan", "is_fake": False, "fake_prob": None, "error": "bad"},
    ]
    pred = tmp_path / "detector_eval" / "predictions.jsonl"
    pred.parent.mkdir()
    pred.write_text("\n".join(json.dumps(r) for r in recs) + "\n")
    assert main(["eval", "detection", "--pred", str(pred), "--output-dir", str(tmp_path / "det")]) == 0
    m = json.loads((tmp_path / "det" / "metrics.json").read_text())
    assert m["per_subset"]["progan"]["accuracy"] == 50.0 and m["num_unscored"] == 1
    # cls-eval's own metrics.json shape is readable by compare
    (pred.parent / "metrics.json").write_text(
        json.dumps({"metrics": detection_metrics(recs[:2]), "n_images": 3, "config": {"perturbation": "jpeg:50"}})
    )
    (t,) = compare([pred.parent])
    assert t.kind == "detection" and t.rows[0]["GANs"] == 50.0 and t.rows[0]["perturbation"] == "jpeg:50"


def paper_raster(polys, h, w):
    """The reference evaluation's drawing, written out here with cv2: float32 -> int32, fillPoly value 1."""
    import cv2

    mask = np.zeros((h, w), np.uint8)
    for p in polys:
        cv2.fillPoly(mask, [np.asarray(p, np.float32).reshape(-1, 2).astype(np.int32)], 1)
    return mask


def test_localization_defaults_to_the_papers_rasterization(run_inputs, tmp_path):
    root, pred_path, gts, preds = run_inputs
    outs = {}
    for raster in ("default", "coco"):
        outs[raster] = tmp_path / raster
        extra = [] if raster == "default" else ["--gt-raster", raster]
        assert (
            main(
                [
                    "eval",
                    "localization",
                    "--pred",
                    str(pred_path),
                    "--gt",
                    str(root),
                    "--dataset",
                    "synthscars",
                    "--output-dir",
                    str(outs[raster]),
                    "--workers",
                    "1",
                    "--no-plots",
                    *extra,
                ]
            )
            == 0
        )
    paper = json.loads((outs["default"] / "metrics.json").read_text())
    coco = json.loads((outs["coco"] / "metrics.json").read_text())
    assert paper["protocol"]["gt_raster"] == "paper" and coco["protocol"]["gt_raster"] == "coco"
    counts = [
        pixel_counts(rasterize_polygons(preds[n], H, W) if n in preds else None, paper_raster(gts[n], H, W))
        for n in sorted(gts)
    ]
    assert paper["overall"]["miou"] == pytest.approx(100 * np.mean([legion_miou(*c) for c in counts]), abs=1e-9)
    assert paper["overall"]["f1"] == pytest.approx(100 * np.mean([legion_f1(*c[:3]) for c in counts]), abs=1e-9)
    assert paper["overall"]["f1"] != pytest.approx(coco["overall"]["f1"])
    # eval compare refuses to put the two in one table, unless asked, and then says which is which
    assert main(["eval", "compare", str(outs["default"]), str(outs["coco"])]) == 2
    assert (
        main(
            [
                "eval",
                "compare",
                str(outs["default"]),
                str(outs["coco"]),
                "--allow-mixed-protocols",
                "--output-dir",
                str(tmp_path / "mixed.md"),
            ]
        )
        == 0
    )
    table = (tmp_path / "mixed.md").read_text()
    assert "GT raster" in table and "| paper |" in table and "| coco |" in table and "WARNING: mixed" in table
    assert main(["eval", "compare", str(outs["coco"]), "--with-paper", "--output-dir", str(tmp_path / "p.md")]) == 0
    assert "scored with --gt-raster coco" in (tmp_path / "p.md").read_text()
