"""Check a SynthScars-layout dataset before a long training job.

    legion data check --root data/SynthScars --split train          # readable summary
    legion data check --root data/SynthScars --split test --json    # the same as JSON

Reports records, refs, images found / missing / unreadable (with reasons and conversions), refs
located in the caption and dropped (and why), polygons outside their image, and mask-area
statistics, and names every unusable record with its image file and the reason: the text summary
shows the first few per reason and the count, `--json` lists all of them (`unusable`, and every
unreadable file under `images.unreadable_files`). `--quick` reads the image headers and the files'
end markers (a file cut after its header is "truncated") instead of decoding every image. Exit code
0 when the split is usable (at least one usable record and at most --max-unusable-fraction of the
records unusable), 1 otherwise (the summary says why), 2 when --root or --annotations does not exist.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from pycocotools import mask as mask_utils
from tqdm import tqdm

from legion.data.images import ImageReadError, read_image_info, read_image_size
from legion.data.synthscars import (
    AnnotationFormatError,
    PathEscapeError,
    find_annotation_file,
    load_annotations,
    polygon_area,
    polygons_outside,
    resolve_image_path,
    resolve_spans,
)
from legion.errors import require_path


def _stats(values: list[float]) -> dict | None:
    if not values:
        return None
    return {
        "count": len(values),
        "min": min(values),
        "median": statistics.median(values),
        "mean": statistics.fmean(values),
        "max": max(values),
    }


def _probe(path: Path, decode: bool) -> tuple[tuple[int, int] | None, str | None, str | None, str]:
    """((H, W) or None, failure reason or None, conversion or None, failure detail)."""
    try:
        if decode:
            result = read_image_info(path)
            return result.image.shape[:2], None, result.conversion, ""
        return read_image_size(path, check_end=True), None, None, ""
    except ImageReadError as err:
        return None, err.reason, None, err.detail


def _area_fraction(polygons_per_ref: list[list[list[float]]], height: int, width: int) -> tuple[list[float], float]:
    """(per-ref area fractions, union area fraction), from RLEs without decoding full masks."""
    per_ref, rles = [], []
    for polygons in polygons_per_ref:
        ref_rles = [mask_utils.frPyObjects([p], height, width)[0] for p in polygons]
        merged = mask_utils.merge(ref_rles) if len(ref_rles) > 1 else ref_rles[0]
        per_ref.append(float(mask_utils.area(merged)) / (height * width))
        rles.append(merged)
    union = mask_utils.merge(rles) if len(rles) > 1 else rles[0]
    return per_ref, float(mask_utils.area(union)) / (height * width)


def check_split(
    root: str | Path,
    split: str = "train",
    annotation_path: str | Path | None = None,
    allow_absolute: bool = False,
    decode: bool = True,
    workers: int = 4,
    max_unusable_fraction: float = 0.05,
    max_examples: int = 20,
    progress: bool = False,
) -> dict:
    """The data-check summary as a dict (what `--json` prints). `summary["usable"]` is the verdict;
    `summary["unusable"]` names every unusable record: {reason: [{"record", "file", "detail"}, ...]}."""
    summary: dict = {"root": str(root), "split": split, "usable": False, "fatal": None}
    try:
        path = Path(annotation_path) if annotation_path else find_annotation_file(root, split)
        records, report = load_annotations(path)
    except (FileNotFoundError, AnnotationFormatError) as err:
        summary["fatal"] = str(err)
        return summary
    summary["annotation_file"] = str(path)
    summary["entries"] = report.num_entries
    summary["records"] = len(records)
    summary["refs"] = sum(len(r.refs) for r in records)
    summary["records_without_refs"] = sum(1 for r in records if not r.refs)
    summary["annotation_errors"] = dict(report.counts("error"))
    summary["annotation_warnings"] = dict(report.counts("warning"))
    summary["annotation_examples"] = [str(p) for p in report.problems[:max_examples]]
    summary["annotation_problems"] = [str(p) for p in report.problems]  # all of them (records dropped or mended)

    # images: resolve, then probe each distinct file once
    unusable: dict[str, str] = {}
    details: dict[str, dict] = {}  # record id -> {"record", "file", "detail"} of its unusable entry

    def mark(record, reason: str, file, detail: str = "") -> None:
        unusable[record.id] = reason
        details[record.id] = {"record": record.id, "file": str(file), "detail": detail}

    paths: dict[str, Path] = {}
    escape_examples: list[str] = []
    for record in records:
        try:
            paths[record.id] = resolve_image_path(root, split, record.img_file_name, allow_absolute)
        except PathEscapeError:
            mark(record, "path_escape", record.img_file_name, "img_file_name leaves the images folder")
            escape_examples.append(f"path escape: record {record.id}, img_file_name {record.img_file_name!r}")
    distinct = sorted(set(paths.values()))
    with ThreadPoolExecutor(max(1, workers)) as pool:
        probes = dict(
            zip(
                distinct,
                tqdm(
                    pool.map(lambda p: _probe(p, decode), distinct),
                    total=len(distinct),
                    disable=not progress,
                    desc="images",
                    file=sys.stderr,
                ),
            )
        )
    failures = Counter(reason for _, reason, _, _ in probes.values() if reason)
    summary["images"] = {
        "distinct": len(distinct),
        "found": sum(1 for s, _, _, _ in probes.values() if s is not None),
        "missing": failures.pop("missing", 0),
        "unreadable": dict(failures),
        "unreadable_files": [
            {"file": str(p), "reason": reason, "detail": detail}
            for p, (_, reason, _, detail) in probes.items()
            if reason and reason != "missing"
        ],
        "conversions": dict(Counter(c for _, _, c, _ in probes.values() if c)),
        "decoded": decode,
        "records_sharing_an_image": sum(n - 1 for n in Counter(paths.values()).values() if n > 1),
    }
    missing_examples = [f"missing image: record {rid}, {p}" for rid, p in paths.items() if probes[p][1] == "missing"]
    summary["images"]["missing_examples"] = (escape_examples + missing_examples)[:max_examples]
    summary["images"]["path_escapes"] = len(escape_examples)

    # spans, geometry and areas
    located, dropped = Counter(), Counter()
    ref_areas, union_areas, outside_examples = [], [], []
    empty_masks = degenerate = 0
    for record in records:
        spans, drops = resolve_spans(record)
        located.update(s.method for s in spans)
        dropped.update(reason for _, reason in drops)
        if record.id in unusable:
            continue
        size, reason, _, detail = probes[paths[record.id]]
        if size is None:
            problem = "image_missing" if reason == "missing" else "image_unreadable"
            mark(record, problem, paths[record.id], reason if not detail else f"{reason}: {detail}")
            continue
        if not spans:
            mark(record, "no_grounded_ref", paths[record.id], "no ref sentence found in the caption")
            continue
        height, width = size
        kept = [record.refs[s.ref_index] for s in spans]
        over = max(polygons_outside(r.polygons, height, width) for r in kept)
        if over > 0:
            mark(record, "polygon_outside_image", paths[record.id], f"a vertex {over:.1f} px outside {width}x{height}")
            outside_examples.append(
                f"polygon outside image: record {record.id}, a vertex {over:.1f} px beyond "
                f"the tolerated {width}x{height} frame"
            )
            continue
        per_ref, union = _area_fraction([r.polygons for r in kept], height, width)
        for ref, area in zip(kept, per_ref):
            if all(polygon_area(p) == 0 for p in ref.polygons):
                degenerate += 1  # excluded from area statistics (docs/data_formats.md §6)
                continue
            empty_masks += area == 0
            ref_areas.append(area)
        union_areas.append(union)
    summary["spans"] = {"located": dict(located), "dropped": dict(dropped)}
    summary["masks"] = {
        "ref_area_fraction": _stats(ref_areas),
        "union_area_fraction": _stats(union_areas),
        "empty_masks": int(empty_masks),
        "degenerate_refs": degenerate,
        "outside_examples": outside_examples[:max_examples],
    }
    n_unusable = len(unusable)
    summary["unusable_records"] = dict(Counter(unusable.values()))
    summary["unusable"] = {
        reason: [details[rid] for rid, r in unusable.items() if r == reason]
        for reason in sorted(set(unusable.values()))
    }
    summary["usable_records"] = len(records) - n_unusable
    fraction = n_unusable / len(records) if records else 1.0
    summary["unusable_fraction"] = fraction
    summary["max_unusable_fraction"] = max_unusable_fraction
    summary["usable"] = summary["usable_records"] > 0 and fraction <= max_unusable_fraction
    return summary


def _fmt_stats(stats: dict | None) -> str:
    if not stats:
        return "n/a"
    return (
        f"min {stats['min']:.4f}  median {stats['median']:.4f}  mean {stats['mean']:.4f}  "
        f"max {stats['max']:.4f}  (n={stats['count']})"
    )


def _fmt_counts(counts: dict) -> str:
    return ", ".join(f"{k} {v}" for k, v in sorted(counts.items())) or "none"


def _named(s: dict, per_reason: int) -> list[str]:
    """Text lines naming the unusable records (first `per_reason` per reason) and unreadable files."""
    lines = []
    for reason, entries in s.get("unusable", {}).items():
        lines.append(f"  {reason} ({len(entries)} records):")
        for e in entries[:per_reason]:
            lines.append(f"    record {e['record']}: {e['file']}" + (f" ({e['detail']})" if e["detail"] else ""))
        if len(entries) > per_reason:
            lines.append(f"    ... and {len(entries) - per_reason} more (--json lists all)")
    return lines


def format_summary(s: dict, per_reason: int = 5) -> str:
    lines = [f"SynthScars check: {s['root']} [{s['split']}]"]
    if s.get("fatal"):
        return "\n".join(lines + [f"  FATAL: {s['fatal']}", "  verdict: NOT USABLE"])
    img, masks = s["images"], s["masks"]
    lines += [
        f"  annotation file   {s['annotation_file']}",
        f"  records           {s['records']} (of {s['entries']} entries; {s['records_without_refs']} without refs)",
        f"  refs              {s['refs']}",
        f"  annotation errors {_fmt_counts(s['annotation_errors'])}",
        f"  annotation notes  {_fmt_counts(s['annotation_warnings'])}",
        f"  images            {img['found']} found / {img['distinct']} distinct, {img['missing']} missing, "
        f"{img['path_escapes']} names rejected (escape the root), "
        f"unreadable: {_fmt_counts(img['unreadable'])} ({'decoded' if img['decoded'] else 'headers and end markers'})",
        f"  conversions       {_fmt_counts(img['conversions'])}",
        f"  shared images     {img['records_sharing_an_image']} records reuse an image of another record",
        f"  refs located      {_fmt_counts(s['spans']['located'])}",
        f"  refs dropped      {_fmt_counts(s['spans']['dropped'])}",
        f"  ref mask area     {_fmt_stats(masks['ref_area_fraction'])}",
        f"  union mask area   {_fmt_stats(masks['union_area_fraction'])}",
        f"  empty masks       {masks['empty_masks']} (degenerate refs excluded: {masks['degenerate_refs']})",
        f"  unusable records  {sum(s['unusable_records'].values())}: {_fmt_counts(s['unusable_records'])}",
        f"  usable records    {s['usable_records']} ({100 * (1 - s['unusable_fraction']):.1f}%)",
    ]
    examples = s["annotation_examples"] + img["missing_examples"] + masks["outside_examples"]
    if examples:
        lines.append("  first problems:")
        lines += [f"    {e}" for e in examples[:20]]
    named = _named(s, per_reason)
    if named:
        lines.append(f"  unusable records (first {per_reason} per reason):")
        lines += named
    verdict = (
        "USABLE"
        if s["usable"]
        else (
            f"NOT USABLE (unusable fraction {s['unusable_fraction']:.3f} > {s['max_unusable_fraction']} "
            "or no usable record)"
        )
    )
    lines.append(f"  verdict: {verdict}")
    return "\n".join(lines)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="action", metavar="action", required=True)
    check = sub.add_parser(
        "check",
        help="validate a SynthScars-layout split (exit 0 if usable, 1 if not)",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    check.add_argument("--root", required=True, help="dataset root holding <split>/images and <split>/annotations")
    check.add_argument("--split", default="train", choices=["train", "test"], help="split to check (default train)")
    check.add_argument("--annotations", default=None, help="annotation file (default: found under --root)")
    check.add_argument("--json", action="store_true", help="print the summary as JSON")
    check.add_argument("--quick", action="store_true", help="read image headers and end markers only (no full decode)")
    check.add_argument(
        "--allow-absolute-paths",
        action="store_true",
        help="use absolute img_file_name values as they are (default: by base name under images/)",
    )
    check.add_argument(
        "--max-unusable-fraction",
        type=float,
        default=0.05,
        help="largest fraction of unusable records for exit code 0 (default 0.05)",
    )
    check.add_argument("--workers", type=int, default=4, help="threads reading images (default 4)")


def run(args: argparse.Namespace) -> int:
    require_path(args.root, "--root", "dir")
    if args.annotations:
        require_path(args.annotations, "--annotations", "file")
    summary = check_split(
        args.root,
        args.split,
        args.annotations,
        args.allow_absolute_paths,
        not args.quick,
        args.workers,
        args.max_unusable_fraction,
        progress=not args.json,
    )
    print(json.dumps(summary, indent=1) if args.json else format_summary(summary))
    return 0 if summary["usable"] else 1
