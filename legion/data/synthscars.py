"""SynthScars: annotation reading + validation, record -> training sample, collate, epoch sampler.

Facts and rules: docs/data_formats.md (format §3, caption template §4, span rule §5.3, paths §2),
docs/model.md §3 (answer, labels, truncation), §4.2 (CLIP) and §7 (SAM).

    records, report = load_annotations(find_annotation_file(root, "train"))
    ds = SynthScarsDataset(root, "train", tokenizer, sam_input_size=512)
    loader = DataLoader(ds, batch_size=2, sampler=EpochSampler(len(ds), seed=0), collate_fn=collate)

Every problem names the record id and the field; nothing is dropped silently: drops and warnings are
counted in `AnnotationReport` / `SynthScarsDataset.report`, and a sample whose image turns out to be
unreadable becomes a `SkippedSample` that `collate` counts and removes (a long run never dies on one
bad image).
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np
import torch
from pycocotools import mask as mask_utils

from legion.data.images import DEFAULT_MAX_PIXELS, ImageReadError, read_image, read_image_size
from legion.errors import LegionError, MissingFileError
from legion.model.conversation import GCG_QUESTION, IGNORE_INDEX, SEG, encode_conversation, tag_phrase
from legion.model.preprocessing import clip_preprocess, sam_preprocess

log = logging.getLogger(__name__)

PREFIX = "Upon examining the image. I have found: "
MARKER = "\nTo elaborate, I have found the following artifacts. "
SPLITS = ("train", "test")
ANNOTATION_DIR_NAMES = ("annotations", "annoations")  # the README's typo is accepted too
# A vertex this far outside the image (fraction of the side, plus 2 px) means the polygon belongs to
# another frame (resized or EXIF-rotated image); sub-pixel overflow is normal and just clipped.
OUTSIDE_TOLERANCE = 0.05


# --- data types ----------------------------------------------------------------------------
@dataclass
class Ref:
    sentence: str
    explanation: str
    polygons: list[list[float]]  # flat [x1, y1, x2, y2, ...] in stored-pixel coordinates
    artifact_category: str | None = None  # ToyScars only; SynthScars' release has no category


@dataclass
class Record:
    id: str
    img_file_name: str
    caption: str
    refs: list[Ref]
    content_type: str | None = None  # human | object | animal | scene (ToyScars; absent in the release)
    artifact_category: str | None = None  # structure | distortion | physics (ToyScars; absent in the release)


@dataclass(frozen=True)
class Problem:
    record_id: str | None  # None for file-level problems
    field: str  # e.g. "refs[2].segmentation[0]"
    code: str  # short machine-readable kind, counted in reports
    message: str
    severity: str = "error"  # "error": something was dropped; "warning": kept as is

    def __str__(self) -> str:
        where = f"record {self.record_id}" if self.record_id is not None else "file"
        return f"{self.severity}: {where}, {self.field}: {self.message} [{self.code}]"


@dataclass
class AnnotationReport:
    path: str = ""
    num_entries: int = 0
    problems: list[Problem] = field(default_factory=list)

    def add(self, record_id, field_name, code, message, severity="error") -> None:
        problem = Problem(record_id, field_name, code, message, severity)
        self.problems.append(problem)
        (log.warning if severity == "error" else log.info)("%s: %s", self.path, problem)

    def counts(self, severity: str | None = None) -> Counter:
        return Counter(p.code for p in self.problems if severity is None or p.severity == severity)

    @property
    def errors(self) -> list[Problem]:
        return [p for p in self.problems if p.severity == "error"]

    @property
    def warnings(self) -> list[Problem]:
        return [p for p in self.problems if p.severity == "warning"]


class AnnotationFormatError(LegionError, ValueError):
    """The annotation file as a whole is unusable (not JSON, not a list)."""


class PathEscapeError(LegionError, ValueError):
    """An annotation's image name would leave the data root."""


# --- reading and validation ---------------------------------------------------------------
def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _parse_polygon(poly: Any) -> tuple[list[float] | None, str]:
    if not isinstance(poly, list):
        return None, f"polygon is a {type(poly).__name__}, expected a flat list of numbers"
    if not all(_is_number(v) for v in poly):
        return None, "polygon contains a value that is not a number"
    if len(poly) % 2:
        return None, f"odd number of coordinates ({len(poly)})"
    if len(poly) < 6:
        return None, f"fewer than 3 points ({len(poly) // 2})"
    if not all(math.isfinite(v) for v in poly):
        return None, "NaN or infinite coordinate"
    return [float(v) for v in poly], ""


def polygon_area(poly: Sequence[float]) -> float:
    xy = np.asarray(poly, dtype=np.float64).reshape(-1, 2)
    x, y = xy[:, 0], xy[:, 1]
    return 0.5 * abs(float(np.dot(x, np.roll(y, -1)) - np.dot(y, np.roll(x, -1))))


def _parse_ref(record_id: str, index: int, raw: Any, caption: str, report: AnnotationReport) -> Ref | None:
    where = f"refs[{index}]"
    if not isinstance(raw, dict):
        report.add(record_id, where, "wrong_type", f"ref is a {type(raw).__name__}, expected an object; ref dropped")
        return None
    sentence = raw.get("sentence")
    if not isinstance(sentence, str) or not sentence.strip():
        code = "missing_field" if sentence is None else "empty_sentence"
        report.add(record_id, f"{where}.sentence", code, "missing or empty sentence; ref dropped")
        return None
    explanation = raw.get("explanation")
    if explanation is None:
        report.add(record_id, f"{where}.explanation", "missing_field", "no explanation; using ''", "warning")
        explanation = ""
    elif not isinstance(explanation, str):
        report.add(record_id, f"{where}.explanation", "wrong_type", "explanation is not a string; ref dropped")
        return None
    elif not explanation.strip():
        report.add(
            record_id,
            f"{where}.explanation",
            "empty_explanation",
            "empty explanation (valid: the answer reads 'sentence:')",
            "warning",
        )
    segmentation = raw.get("segmentation")
    if not isinstance(segmentation, list) or not segmentation:
        report.add(
            record_id,
            f"{where}.segmentation",
            "missing_field" if segmentation is None else "bad_polygon",
            "missing or empty segmentation; ref dropped",
        )
        return None
    polygons = []
    for j, poly in enumerate(segmentation):
        parsed, why = _parse_polygon(poly)
        if parsed is None:
            report.add(record_id, f"{where}.segmentation[{j}]", "bad_polygon", f"{why}; polygon dropped")
            continue
        if polygon_area(parsed) == 0.0:
            report.add(
                record_id,
                f"{where}.segmentation[{j}]",
                "degenerate_polygon",
                "zero-area polygon (rasterizes to an empty or 1-px mask); kept",
                "warning",
            )
        polygons.append(parsed)
    if not polygons:
        report.add(record_id, f"{where}.segmentation", "bad_polygon", "no valid polygon left; ref dropped")
        return None
    if sentence not in caption:
        report.add(
            record_id,
            f"{where}.sentence",
            "sentence_not_in_caption",
            f"sentence {sentence!r} does not occur in the caption; kept, span resolution will drop it",
            "warning",
        )
    category = raw.get("artifact_category")
    return Ref(sentence, explanation, polygons, category if isinstance(category, str) else None)


def parse_records(data: Any, report: AnnotationReport) -> list[Record]:
    """Validate the decoded JSON (a list of one-key objects) and build records. See load_annotations."""
    if not isinstance(data, list):
        raise AnnotationFormatError(f"{report.path}: top level is a {type(data).__name__}, expected a JSON list")
    report.num_entries = len(data)
    records: list[Record] = []
    seen_ids: set[str] = set()
    seen_content: dict[str, str] = {}
    for index, entry in enumerate(data):
        if not isinstance(entry, dict) or len(entry) != 1:
            report.add(
                f"#{index}",
                "<entry>",
                "not_one_key_object",
                "entry is not an object with exactly one key (the annotation id); entry dropped",
            )
            continue
        record_id, body = next(iter(entry.items()))
        if record_id in seen_ids:
            report.add(record_id, "<id>", "duplicate_id", f"id already used by an earlier entry (#{index}); dropped")
            continue
        seen_ids.add(record_id)
        if not isinstance(body, dict):
            report.add(record_id, "<value>", "wrong_type", f"value is a {type(body).__name__}; record dropped")
            continue
        missing = [k for k in ("img_file_name", "caption", "refs") if k not in body]
        if missing:
            report.add(record_id, missing[0], "missing_field", f"missing field(s) {missing}; record dropped")
            continue
        name, caption, raw_refs = body["img_file_name"], body["caption"], body["refs"]
        if not isinstance(name, str) or not name.strip():
            report.add(record_id, "img_file_name", "wrong_type", "img_file_name is not a non-empty string; dropped")
            continue
        if not isinstance(caption, str):
            report.add(record_id, "caption", "wrong_type", "caption is not a string; record dropped")
            continue
        if not isinstance(raw_refs, list):
            report.add(record_id, "refs", "wrong_type", "refs is not a list; record dropped")
            continue
        caption = caption.strip('"').strip()  # the reference loader's normalisation
        if not caption:
            report.add(record_id, "caption", "empty_caption", "empty caption; record dropped")
            continue
        # strip() removes MARKER's trailing space when a caption ends with it (records without refs)
        if not caption.startswith(PREFIX) or (MARKER not in caption and not caption.endswith(MARKER.rstrip())):
            report.add(
                record_id,
                "caption",
                "caption_template",
                "caption does not follow PREFIX + summary + MARKER + details; spans fall back to search",
                "warning",
            )
        parsed = [_parse_ref(record_id, i, raw, caption, report) for i, raw in enumerate(raw_refs)]
        refs = [ref for ref in parsed if ref is not None]
        if not raw_refs:
            report.add(record_id, "refs", "no_refs", "record has no refs (unusable for training)", "warning")
        fingerprint = json.dumps([name, caption, [asdict(r) for r in refs]], sort_keys=True)
        if fingerprint in seen_content:
            report.add(
                record_id,
                "<record>",
                "duplicate_record",
                f"same image, caption and refs as record {seen_content[fingerprint]}; kept",
                "warning",
            )
        else:
            seen_content[fingerprint] = record_id
        content_type = body.get("content_type")
        category = body.get("artifact_category")
        records.append(
            Record(
                record_id,
                name,
                caption,
                refs,
                content_type if isinstance(content_type, str) else None,
                category if isinstance(category, str) else None,
            )
        )
    return records


def load_annotations(path: str | os.PathLike) -> tuple[list[Record], AnnotationReport]:
    """Read a SynthScars annotation file. Raises AnnotationFormatError when the file is unusable as a
    whole; per-record problems are collected in the report (record id + field) and never raise."""
    report = AnnotationReport(path=str(path))
    try:
        with open(path, encoding="utf-8-sig") as fh:
            data = json.load(fh)
    except json.JSONDecodeError as err:
        raise AnnotationFormatError(
            f"{path}: malformed JSON at line {err.lineno}, column {err.colno}: {err.msg}"
        ) from None
    except UnicodeDecodeError as err:
        raise AnnotationFormatError(f"{path}: not UTF-8 text ({err.reason} at byte {err.start})") from None
    return parse_records(data, report), report


def records_to_json(records: Sequence[Record]) -> list[dict]:
    """The released format (one-key objects); optional fields only when set."""
    out = []
    for rec in records:
        refs = []
        for ref in rec.refs:
            item = {
                "sentence": ref.sentence,
                "explanation": ref.explanation,
                "bbox": None,
                "segmentation": ref.polygons,
            }
            if ref.artifact_category is not None:
                item["artifact_category"] = ref.artifact_category
            refs.append(item)
        body: dict[str, Any] = {"img_file_name": rec.img_file_name, "caption": rec.caption, "refs": refs}
        if rec.content_type is not None:
            body["content_type"] = rec.content_type
        if rec.artifact_category is not None:
            body["artifact_category"] = rec.artifact_category
        out.append({rec.id: body})
    return out


# --- paths -----------------------------------------------------------------------------------
def find_annotation_file(root: str | os.PathLike, split: str) -> Path:
    """`<root>/<split>/annotations/<split>.json` (also `annoations`, and the reference loader's
    `<root>/train/annotations/<split>.json`). Raises FileNotFoundError naming every place tried."""
    root = Path(root)
    tried = []
    for folder in (split, "train"):
        for dir_name in ANNOTATION_DIR_NAMES:
            candidate = root / folder / dir_name / f"{split}.json"
            tried.append(str(candidate))
            if candidate.is_file():
                return candidate
    raise MissingFileError(f"no annotation file for split {split!r} under {root}; tried: " + ", ".join(tried))


def images_dir(root: str | os.PathLike, split: str) -> Path:
    return Path(root) / split / "images"


def resolve_image_path(root: str | os.PathLike, split: str, name: str, allow_absolute: bool = False) -> Path:
    """Where the image of `img_file_name == name` lives (docs/data_formats.md §2). Lexical only.

    - relative name: `<root>/<split>/images/<name>`; a name that would leave that folder raises
      PathEscapeError;
    - absolute name (written on another machine, POSIX or Windows): by base name under the images
      folder, unless `allow_absolute` (then used as is).
    """
    if not isinstance(name, str) or not name.strip() or "\x00" in name:
        raise PathEscapeError(f"invalid image name {name!r}")
    folder = images_dir(root, split)
    posix = name.strip().replace("\\", "/")
    if posix.startswith("/") or re.match(r"^[A-Za-z]:/", posix):
        if allow_absolute:
            return Path(name)
        base = posix.rstrip("/").rsplit("/", 1)[-1]
        if base in ("", ".", ".."):
            raise PathEscapeError(f"absolute image name {name!r} has no file name")
        return folder / base
    parts: list[str] = []
    for part in PurePosixPath(posix).parts:
        if part in ("", "."):
            continue
        if part == "..":
            if not parts:
                raise PathEscapeError(f"image name {name!r} escapes the data root")
            parts.pop()
        else:
            parts.append(part)
    if not parts:
        raise PathEscapeError(f"image name {name!r} names no file")
    return folder.joinpath(*parts)


# --- geometry ----------------------------------------------------------------------------------
def rasterize_polygons(polygons: Sequence[Sequence[float]], height: int, width: int) -> np.ndarray:
    """One mask per ref: pycocotools rasterization of each polygon, OR-union, uint8 {0,1} [H, W].

    Clipping = the polygon intersected with the image frame (vertices are never moved, which would
    distort the shape). pycocotools crops beyond the right/bottom border itself but rounds negative
    coordinates toward zero, so polygons reaching left/above the image are shifted by a whole number
    of pixels onto a larger canvas and the image window is cut out of it.
    """
    mask = np.zeros((height, width), dtype=np.uint8)
    for poly in polygons:
        xy = np.asarray(poly, dtype=np.float64).reshape(-1, 2)
        shift_x, shift_y = (max(0, int(np.ceil(-xy[:, k].min()))) for k in (0, 1))
        shifted = (xy + [shift_x, shift_y]).ravel().tolist()
        rle = mask_utils.frPyObjects([shifted], height + shift_y, width + shift_x)
        mask |= mask_utils.decode(rle)[shift_y:, shift_x:, 0]
    return mask


def polygons_outside(
    polygons: Sequence[Sequence[float]], height: int, width: int, tolerance: float = OUTSIDE_TOLERANCE
) -> float:
    """How far (px) the farthest vertex lies beyond the tolerated frame; 0 if all are inside."""
    worst = 0.0
    tol_x, tol_y = tolerance * width + 2.0, tolerance * height + 2.0
    for poly in polygons:
        xy = np.asarray(poly, dtype=np.float64).reshape(-1, 2)
        over = max(
            float((-tol_x - xy[:, 0]).max()),
            float((xy[:, 0] - width - tol_x).max()),
            float((-tol_y - xy[:, 1]).max()),
            float((xy[:, 1] - height - tol_y).max()),
        )
        worst = max(worst, over)
    return worst


# --- spans and answers (docs/data_formats.md §5.3) ------------------------------------------------
@dataclass(frozen=True)
class Span:
    start: int
    end: int
    ref_index: int
    method: str  # "anchored" | "after_cursor" | "anywhere"


def _occurrences(text: str, sub: str, start: int = 0) -> Iterator[int]:
    pos = text.find(sub, start)
    while pos >= 0:
        yield pos
        pos = text.find(sub, pos + 1)


def resolve_spans(record: Record) -> tuple[list[Span], list[tuple[int, str]]]:
    """Caption spans of the refs: (spans sorted by start, dropped [(ref index, reason)]).

    Sequential anchored matching in the detail section: for each ref in list order, find
    `sentence + ":" + explanation` from the cursor; span = its first len(sentence) chars. Fallbacks:
    first occurrence of the sentence at/after the cursor, then anywhere, never overlapping a span
    already taken. Unambiguous on duplicates and nested phrases.
    """
    caption = record.caption
    marker = caption.find(MARKER)
    cursor = marker + len(MARKER) if marker >= 0 else 0
    spans: list[Span] = []
    dropped: list[tuple[int, str]] = []

    def free(start: int, end: int) -> bool:
        return all(end <= s.start or start >= s.end for s in spans)

    for index, ref in enumerate(record.refs):
        sentence = ref.sentence
        if not sentence:
            dropped.append((index, "empty_sentence"))
            continue
        anchored = caption.find(f"{sentence}:{ref.explanation}", cursor)
        if anchored >= 0 and free(anchored, anchored + len(sentence)):
            spans.append(Span(anchored, anchored + len(sentence), index, "anchored"))
            cursor = anchored + len(sentence) + 1 + len(ref.explanation)
            continue
        found = next((p for p in _occurrences(caption, sentence, cursor) if free(p, p + len(sentence))), None)
        method = "after_cursor"
        if found is None:
            found = next((p for p in _occurrences(caption, sentence) if free(p, p + len(sentence))), None)
            method = "anywhere"
        if found is None:
            dropped.append((index, "not_in_caption" if sentence not in caption else "overlaps_other_span"))
            continue
        log.info("record %s: refs[%d] located by fallback (%s)", record.id, index, method)
        spans.append(Span(found, found + len(sentence), index, method))
        if method == "after_cursor":
            cursor = found + len(sentence)
    spans.sort(key=lambda s: s.start)
    return spans, dropped


def build_answer(record: Record, spans: Sequence[Span] | None = None) -> tuple[str, list[Ref]]:
    """(answer text, kept refs in [SEG] order): each span -> `<p> span </p> [SEG]`, right to left."""
    if spans is None:
        spans, _ = resolve_spans(record)
    spans = sorted(spans, key=lambda s: s.start)
    answer = record.caption
    for span in reversed(spans):
        answer = answer[: span.start] + tag_phrase(answer[span.start : span.end]) + answer[span.end :]
    return answer, [record.refs[s.ref_index] for s in spans]


# --- training samples --------------------------------------------------------------------------
@dataclass(frozen=True)
class SkippedSample:
    """Returned by the dataset instead of a sample when its image turns out unusable at load time."""

    record_id: str
    image_path: str
    reason: str


@dataclass
class _Item:
    record: Record
    image_path: Path
    refs: list[Ref]
    input_ids: torch.Tensor
    labels: torch.Tensor


class SynthScarsDataset(torch.utils.data.Dataset):
    """Record -> training sample (one conversation per image, one mask per `[SEG]`).

    Records that can never give a sample are filtered once at construction and counted in
    `self.report` (reason -> count): path_escape, image_missing, image_unreadable,
    polygon_outside_image, no_grounded_ref, truncated_past_seg. `truncated_text_only` counts kept
    samples whose tail text (no `[SEG]`) was cut to `max_length`.

    A sample: input_ids Long[L], labels Long[L], clip_pixel_values Float[3, C, C],
    sam_pixel_values Float[3, P, P], sam_resized_size (h, w), original_size (H, W),
    gt_masks Float[N, H, W] {0,1} (N = number of [SEG] in input_ids), image_path, record_id.
    """

    def __init__(
        self,
        root: str | os.PathLike,
        split: str,
        tokenizer,
        clip_size: int = 336,
        sam_input_size: int = 512,
        sam_pad_to: int = 1024,
        max_length: int | None = 961,
        annotation_path: str | os.PathLike | None = None,
        allow_absolute_paths: bool = False,
        records: Sequence[Record] | None = None,
        question: str = GCG_QUESTION,
        use_im_start_end: bool = True,
        check_images: bool = True,
        max_pixels: int | None = DEFAULT_MAX_PIXELS,
    ):
        self.root, self.split = Path(root), split
        self.tokenizer = tokenizer
        self.clip_size, self.sam_input_size, self.sam_pad_to = clip_size, sam_input_size, sam_pad_to
        self.max_length, self.max_pixels = max_length, max_pixels
        self.annotation_report: AnnotationReport | None = None
        if records is None:
            path = Path(annotation_path) if annotation_path else find_annotation_file(root, split)
            records, self.annotation_report = load_annotations(path)
        self.seg_id = tokenizer.convert_tokens_to_ids(SEG)
        self.report: Counter = Counter()
        self.problems: list[Problem] = []
        self.items: list[_Item] = []
        for record in records:
            item = self._prepare(record, allow_absolute_paths, question, use_im_start_end, check_images)
            if item is not None:
                self.items.append(item)

    def _skip(self, record: Record, reason: str, message: str) -> None:
        self.report[reason] += 1
        field_name = {
            "path_escape": "img_file_name",
            "image_missing": "img_file_name",
            "image_unreadable": "img_file_name",
            "polygon_outside_image": "refs[].segmentation",
            "truncated_past_seg": "caption",
        }.get(reason, "refs")
        self.problems.append(Problem(record.id, field_name, reason, message))
        log.warning("record %s skipped: %s (%s)", record.id, reason, message)

    def _prepare(self, record, allow_absolute, question, use_im_start_end, check_images) -> _Item | None:
        try:
            path = resolve_image_path(self.root, self.split, record.img_file_name, allow_absolute)
        except PathEscapeError as err:
            return self._skip(record, "path_escape", str(err))
        spans, dropped = resolve_spans(record)
        for index, reason in dropped:
            self.report[f"ref_dropped:{reason}"] += 1
            self.problems.append(Problem(record.id, f"refs[{index}].sentence", reason, "ref dropped", "warning"))
        if not spans:
            return self._skip(record, "no_grounded_ref", "no ref could be located in the caption")
        answer, refs = build_answer(record, spans)
        input_ids, labels = encode_conversation(self.tokenizer, answer, question, use_im_start_end)
        if self.max_length is not None and len(input_ids) > self.max_length:
            if bool((input_ids[self.max_length :] == self.seg_id).any()):
                return self._skip(
                    record,
                    "truncated_past_seg",
                    f"{len(input_ids)} text tokens > max_length {self.max_length} cuts a [SEG]",
                )
            self.report["truncated_text_only"] += 1
            input_ids, labels = input_ids[: self.max_length], labels[: self.max_length]
        if check_images:
            try:
                height, width = read_image_size(path)
            except ImageReadError as err:
                return self._skip(record, "image_missing" if err.reason == "missing" else "image_unreadable", str(err))
            over = max(polygons_outside(r.polygons, height, width) for r in refs)
            if over > 0:
                return self._skip(
                    record, "polygon_outside_image", f"a vertex lies {over:.0f} px beyond the {width}x{height} image"
                )
        return _Item(record, path, refs, input_ids, labels)

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> dict | SkippedSample:
        item = self.items[index]
        try:
            return self._load(item)
        except ImageReadError as err:
            log.warning("record %s: image unusable, sample skipped: %s", item.record.id, err)
            return SkippedSample(item.record.id, str(item.image_path), err.reason)
        except (AssertionError, KeyboardInterrupt):
            raise  # broken invariants and Ctrl-C must stop the run
        except Exception as err:  # noqa: BLE001 - one bad sample must not end a long run
            log.exception("record %s: sample skipped after an unexpected error", item.record.id)
            return SkippedSample(item.record.id, str(item.image_path), f"error:{type(err).__name__}")

    def _load(self, item: _Item) -> dict | SkippedSample:
        image = read_image(item.image_path, self.max_pixels)
        height, width = image.shape[:2]
        if max(polygons_outside(r.polygons, height, width) for r in item.refs) > 0:
            return SkippedSample(item.record.id, str(item.image_path), "polygon_outside_image")
        masks = np.stack([rasterize_polygons(r.polygons, height, width) for r in item.refs])
        assert masks.shape[1:] == image.shape[:2], "image and masks must share one frame"
        assert int((item.input_ids == self.seg_id).sum()) == len(masks), "one mask per [SEG]"
        sam_pixels, resized = sam_preprocess(image, self.sam_input_size, self.sam_pad_to)
        return {
            "input_ids": item.input_ids,
            "labels": item.labels,
            "clip_pixel_values": clip_preprocess(image, self.clip_size),
            "sam_pixel_values": sam_pixels,
            "sam_resized_size": resized,
            "original_size": (height, width),
            "gt_masks": torch.from_numpy(masks),  # uint8 until collate (4x less IPC between workers)
            "image_path": str(item.image_path),
            "record_id": item.record.id,
        }


def collate(samples: Sequence[dict | SkippedSample], pad_id: int = 0) -> dict | None:
    """Batch dict of docs/ARCHITECTURE.md: right padding, attention mask from lengths.

    Skipped samples are removed and listed in `batch["skipped"]` as (record_id, reason). Returns
    None when every sample of the batch was skipped (the training loop just moves on).
    """
    skipped = [(s.record_id, s.reason) for s in samples if isinstance(s, SkippedSample)]
    samples = [s for s in samples if not isinstance(s, SkippedSample)]
    if not samples:
        return None
    lengths = [len(s["input_ids"]) for s in samples]
    batch_size, longest = len(samples), max(lengths)
    input_ids = torch.full((batch_size, longest), pad_id, dtype=torch.long)
    labels = torch.full((batch_size, longest), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros((batch_size, longest), dtype=torch.bool)
    for i, (sample, length) in enumerate(zip(samples, lengths)):
        input_ids[i, :length] = sample["input_ids"]
        labels[i, :length] = sample["labels"]
        attention_mask[i, :length] = True
    return {
        "input_ids": input_ids,
        "labels": labels,
        "attention_mask": attention_mask,
        "clip_pixel_values": torch.stack([s["clip_pixel_values"] for s in samples]),
        "sam_pixel_values": torch.stack([s["sam_pixel_values"] for s in samples]),
        "sam_resized_sizes": [tuple(s["sam_resized_size"]) for s in samples],
        "original_sizes": [tuple(s["original_size"]) for s in samples],
        "gt_masks": [s["gt_masks"].float() for s in samples],
        "image_paths": [s["image_path"] for s in samples],
        "record_ids": [s["record_id"] for s in samples],
        "skipped": skipped,
    }


# --- order --------------------------------------------------------------------------------------
class EpochSampler(torch.utils.data.Sampler):
    """Deterministic per (seed, epoch); every epoch visits each of the n records exactly once.

    Distributed: rank r takes positions r, r + world_size, ... of the epoch's permutation, so the
    ranks' shares are disjoint and together cover all n records (no padding, no duplicates; shares
    differ in size by at most one). Resumable: `set_epoch(epoch, position)` skips the first
    `position` indices of this rank's share; `state_dict(consumed)` records where to resume.
    """

    def __init__(self, n: int, seed: int = 0, rank: int = 0, world_size: int = 1, shuffle: bool = True):
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in [0, world_size={world_size})")
        self.n, self.seed, self.rank, self.world_size, self.shuffle = n, seed, rank, world_size, shuffle
        self.epoch, self.position = 0, 0

    def set_epoch(self, epoch: int, position: int = 0) -> None:
        if position < 0 or position > self.share_size():
            raise ValueError(f"position {position} outside this rank's share of {self.share_size()}")
        self.epoch, self.position = epoch, position

    def share_size(self) -> int:
        return len(range(self.rank, self.n, self.world_size))

    def epoch_order(self, epoch: int | None = None) -> list[int]:
        """The permutation of all n indices for `epoch` (the same on every rank)."""
        epoch = self.epoch if epoch is None else epoch
        if not self.shuffle:
            return list(range(self.n))
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        return torch.randperm(self.n, generator=generator).tolist()

    def __iter__(self) -> Iterator[int]:
        share = self.epoch_order()[self.rank :: self.world_size]
        return iter(share[self.position :])

    def __len__(self) -> int:
        return self.share_size() - self.position

    def state_dict(self, consumed: int | None = None) -> dict:
        """`consumed`: indices of this rank's share already trained on in the current epoch."""
        position = self.position if consumed is None else self.position + consumed
        return {
            "epoch": self.epoch,
            "position": position,
            "seed": self.seed,
            "n": self.n,
            "rank": self.rank,
            "world_size": self.world_size,
        }

    def load_state_dict(self, state: dict) -> None:
        if state["n"] != self.n or state["seed"] != self.seed or state["world_size"] != self.world_size:
            raise ValueError(
                f"sampler state {state} does not match n={self.n}, seed={self.seed}, world_size={self.world_size}"
            )
        self.set_epoch(state["epoch"], state["position"])
