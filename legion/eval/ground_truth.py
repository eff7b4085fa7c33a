"""Ground truth and predictions for evaluation: one `GroundTruthItem` per evaluated image.

Ground truth is kept as COCO RLE (or polygons rasterized to RLE on demand), never as dense
arrays, so that a 1,000-image test set needs no more memory than its annotation file.

Matching (docs/data_formats.md §8): an image's ground truth is found by **exact file name**;
a prediction's ``image`` (path relative to the inference image dir) matches a ground-truth
name exactly, or else by its base name when that base name is unique. When the folder the
predictions were made on is known (`prediction_image_root`: the folder `legion infer` recorded next to
``predictions.jsonl``) and the
ground-truth image file too, a name match must also be the same image (the same file or the same
bytes): predictions made on other images that happen to carry the ground truth's names are refused,
as are two records for one image (`check_matching`).
"""

from __future__ import annotations

import json
import os
import warnings
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from pycocotools import mask as coco_mask

from legion.errors import DataError, InputNotFoundError
from legion.record import PredictionRecord
from legion.utils.io import read_jsonl
from legion.utils.rle import mask_to_rle, rle_size, rle_union

DATASETS = ("synthscars", "loki", "richhf")
# How annotated shapes become ground-truth pixels (docs/reproduce.md):
#   paper: as the reference evaluation drew them (the default, so numbers compare with the paper):
#          SynthScars polygons with cv2.fillPoly on vertices cast float32 -> int32 (truncation);
#          LOKI [x, y, w, h] boxes as inclusive, truncated, clipped cv2 rectangles.
#   coco:  pycocotools, as training rasterizes its targets: polygons by area coverage, LOKI boxes
#          as half-open [x, x + w) x [y, y + h) rectangles.
GT_RASTERS = ("paper", "coco")


@dataclass
class GroundTruthItem:
    """Ground truth of one image.

    name: the image's file name (the key predictions are matched on).
    size: ``(H, W)`` of the stored image, or None when unknown (then taken from the prediction).
    union_rle: the whole-image artifact mask as RLE, if already known (LOKI boxes, RichHF heatmaps).
    phrase_polygons: per artifact (ref), its list of flat polygons ``[x1, y1, x2, y2, ...]``
        in pixels of the stored image (SynthScars); the union mask is rasterized from these.
    boxes: LOKI ``[x, y, w, h]`` regions; the union mask is drawn from these once the size is known.
    reference_text: the reference explanation (SynthScars caption, LOKI global description).
    content_type / artifact_category: optional breakdown labels (a category may be a list:
        an image then counts in every category it carries).
    """

    name: str
    size: tuple[int, int] | None = None
    union_rle: dict | None = None
    phrase_polygons: list[list[list[float]]] | None = None
    reference_text: str | None = None
    content_type: str | None = None
    artifact_category: str | list[str] | None = None
    phrase_texts: list[str] | None = None  # SynthScars ref sentences, parallel to phrase_polygons
    boxes: list[list[float]] | None = None  # LOKI [x, y, w, h] regions, drawn at the image size
    boxes_skip_degenerate: bool = False
    raster: str = "paper"  # "paper" | "coco" (GT_RASTERS): how polygons/boxes are drawn
    path: str | None = None  # the stored image file, when found (the same-image check of `match_predictions`)
    _phrase_rles: list[dict] | None = field(default=None, repr=False)

    def resolved_size(self, fallback: tuple[int, int] | None = None) -> tuple[int, int]:
        if self.size is not None:
            return self.size
        if self.union_rle is not None:
            return rle_size(self.union_rle)
        if fallback is None:
            raise DataError(f"{self.name}: image size unknown (image file not found and no prediction)")
        return fallback

    def phrase_rles(self, size: tuple[int, int]) -> list[dict] | None:
        """One RLE per artifact (None when the dataset has no per-phrase masks)."""
        if self.phrase_polygons is None:
            return None
        if self._phrase_rles is None or (self._phrase_rles and rle_size(self._phrase_rles[0]) != tuple(size)):
            draw = paper_polygons_to_rle if self.raster == "paper" else polygons_to_rle
            self._phrase_rles = [draw(p, *size) for p in self.phrase_polygons]
        return self._phrase_rles

    def mask_rle(self, size: tuple[int, int]) -> dict:
        """The union GT mask at ``size = (H, W)`` as RLE."""
        if self.union_rle is not None:
            if rle_size(self.union_rle) != tuple(size):
                raise DataError(
                    f"{self.name}: ground-truth mask size {rle_size(self.union_rle)} != image size {tuple(size)}"
                )
            return self.union_rle
        if self.boxes is not None:
            from legion.data.benchmarks import loki_box_mask

            if self.raster == "coco":
                return boxes_to_rle(self.boxes, *size)
            return mask_to_rle(loki_box_mask(self.boxes, size[0], size[1], self.boxes_skip_degenerate))
        phrases = self.phrase_rles(size) or []
        return rle_union(phrases, size=size)


def polygons_to_rle(polygons: Sequence[Sequence[float]], height: int, width: int) -> dict:
    """Union of flat polygons as RLE, pixel-identical to the training rasterizer
    ``legion.data.synthscars.rasterize_polygons`` (pycocotools, clipped to the image).

    Polygons inside the top-left quadrant (the usual case) are rasterized straight to RLE; one
    reaching negative coordinates goes through the training rasterizer, which shifts it onto a
    larger canvas because pycocotools rounds negative coordinates toward zero. Polygons with fewer
    than 3 vertices have no area and are skipped (pycocotools would read 4 numbers as a box).
    """
    direct, shifted = [], []
    for poly in polygons:
        coords = [float(v) for v in poly]
        coords = coords[: len(coords) // 2 * 2]
        if len(coords) < 6:
            continue
        (direct if min(coords) >= 0 else shifted).append(coords)
    if height == 0 or width == 0 or not (direct or shifted):
        return mask_to_rle(np.zeros((height, width), dtype=np.uint8))
    parts = list(coco_mask.frPyObjects(direct, height, width)) if direct else []
    if shifted:
        from legion.data.synthscars import rasterize_polygons

        parts.append(coco_mask.encode(np.asfortranarray(rasterize_polygons(shifted, height, width))))
    merged = coco_mask.merge(parts, intersect=0) if len(parts) > 1 else parts[0]
    return {"size": [int(height), int(width)], "counts": merged["counts"].decode("ascii")}


def paper_polygons_to_rle(polygons: Sequence[Sequence[float]], height: int, width: int) -> dict:
    """Union of flat polygons as the reference evaluation rasterized SynthScars ground truth:
    vertices cast to float32 then int32 (truncation toward zero), each polygon filled with
    ``cv2.fillPoly`` (value 1, 8-connected edges included), drawing clipped to the image. Covers
    every pixel an edge touches, so masks are a few percent larger than pycocotools' (docs/reproduce.md)."""
    import cv2

    mask = np.zeros((height, width), dtype=np.uint8)
    for poly in polygons:
        coords = np.asarray(poly, dtype=np.float32)
        coords = coords[: coords.size // 2 * 2]
        if coords.size == 0 or height == 0 or width == 0:
            continue
        cv2.fillPoly(mask, [coords.reshape(-1, 2).astype(np.int32)], 1)
    return mask_to_rle(mask)


def boxes_to_rle(boxes: Sequence[Sequence[float]], height: int, width: int) -> dict:
    """Union of ``[x, y, w, h]`` boxes rasterized by pycocotools (half-open, area coverage)."""
    boxes = [[float(v) for v in box] for box in boxes if len(box) == 4 and box[2] > 0 and box[3] > 0]
    if not boxes or height == 0 or width == 0:
        return mask_to_rle(np.zeros((height, width), dtype=np.uint8))
    parts = coco_mask.frPyObjects(np.asarray(boxes, dtype=np.float64), height, width)
    merged = coco_mask.merge(parts, intersect=0) if len(parts) > 1 else parts[0]
    return {"size": [int(height), int(width)], "counts": merged["counts"].decode("ascii")}


def image_size(path: str | os.PathLike) -> tuple[int, int] | None:
    """``(H, W)`` of a stored image from its header (no decoding, EXIF orientation ignored)."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            w, h = im.size
        return int(h), int(w)
    except (OSError, ValueError):
        return None


# --------------------------------------------------------------------------- SynthScars


def load_synthscars(
    gt: str | os.PathLike,
    split: str = "test",
    image_dir: str | os.PathLike | None = None,
    allow_absolute: bool = False,
    raster: str = "paper",
) -> dict[str, GroundTruthItem]:
    """SynthScars ground truth: ``gt`` = dataset root (``<root>/<split>/annotations/<split>.json``)
    or an annotation JSON file. All records whose ``img_file_name`` has the same file name are
    unioned (the same image may carry several ids). Image sizes come from the image headers
    under ``image_dir`` (default ``<root>/<split>/images`` or ``<json dir>/../images``).
    ``raster``: how polygons become pixels (``GT_RASTERS``; default the paper's)."""
    _check_raster(raster)
    from legion.data import synthscars as ss

    gt = Path(gt)
    if gt.is_dir():
        ann_path = Path(ss.find_annotation_file(gt, split))
        root = gt
    elif gt.is_file():
        ann_path, root = gt, None
    else:
        raise InputNotFoundError(f"--gt {gt}: neither a SynthScars root nor an annotation file")
    records, _report = ss.load_annotations(ann_path)
    if image_dir is None:
        image_dir = (root / split / "images") if root is not None else ann_path.parent.parent / "images"
    image_dir = Path(image_dir)

    items: dict[str, GroundTruthItem] = {}
    for rec in records:
        name = os.path.basename(str(rec.img_file_name).replace("\\", "/"))
        if not name or name in (".", ".."):
            warnings.warn(
                f"SynthScars record {rec.id}: unusable img_file_name {rec.img_file_name!r}; skipped", stacklevel=2
            )
            continue
        item = items.get(name)
        if item is None:
            path = _image_path(ss, root, split, image_dir, str(rec.img_file_name), name, allow_absolute)
            size = image_size(path) if path is not None else None
            item = items[name] = GroundTruthItem(
                name=name,
                size=size,
                path=str(path) if path is not None else None,
                phrase_polygons=[],
                phrase_texts=[],
                reference_text=_normalise_space(rec.caption),
                content_type=getattr(rec, "content_type", None),
                raster=raster,
            )
        item.phrase_polygons.extend([list(map(list, ref.polygons)) for ref in rec.refs])
        item.phrase_texts.extend([ref.sentence for ref in rec.refs])
        # categories: the record's and its refs' (ToyScars carries them; the SynthScars release does not)
        found = {
            c
            for c in [getattr(rec, "artifact_category", None)]
            + [getattr(ref, "artifact_category", None) for ref in rec.refs]
            if c
        }
        if found:
            item.artifact_category = sorted(found | set(_labels_of(item.artifact_category)))
    return items


def _image_path(ss, root, split, image_dir: Path, img_file_name: str, name: str, allow_absolute: bool) -> Path | None:
    """The stored image of a record: the data loader's rule (``resolve_image_path``) under a
    dataset root with the default images folder, else ``image_dir/<file name>``; None when the
    name escapes its folder or the file is not there."""
    if root is not None and image_dir == ss.images_dir(root, split):
        try:
            path = ss.resolve_image_path(root, split, img_file_name, allow_absolute=allow_absolute)
        except ss.PathEscapeError:
            return None
        return path if path.is_file() else None
    return _safe_image_path(image_dir, name)


def _check_raster(raster: str) -> None:
    if raster not in GT_RASTERS:
        raise ValueError(f"unknown ground-truth rasterization {raster!r}; choose one of {', '.join(GT_RASTERS)}")


def _labels_of(value) -> list[str]:
    if value is None:
        return []
    return [value] if isinstance(value, str) else list(value)


def _safe_image_path(image_dir: Path, name: str) -> Path | None:
    """``image_dir/name`` when it stays inside ``image_dir`` (annotation names are untrusted)."""
    base = image_dir.resolve()
    path = (base / name).resolve()
    if base not in path.parents:
        return None
    return path if path.is_file() else None


def _normalise_space(text: str | None) -> str | None:
    return None if text is None else " ".join(str(text).split())


# --------------------------------------------------------------------------- LOKI / RichHF


def load_loki(
    gt: str | os.PathLike,
    image_dir: str | os.PathLike | None = None,
    skip_degenerate: bool = False,
    raster: str = "paper",
) -> dict[str, GroundTruthItem]:
    """LOKI ground truth from its UTF-16 annotation list (``legion.data.benchmarks``): the union
    of the item's ``[x, y, w, h]`` boxes, drawn as the reference does (``raster="paper"``:
    inclusive, truncated, clipped) or by pycocotools (``"coco"``: half-open); reference text =
    ``problems.global[0].desc``. Image sizes come from the image headers under ``image_dir``
    (by file name), or else from the predictions."""
    from legion.data import benchmarks

    _check_raster(raster)
    gt = Path(gt)
    if not gt.is_file():
        raise InputNotFoundError(f"--gt {gt}: LOKI needs its annotation JSON file")
    items: dict[str, GroundTruthItem] = {}
    for entry in benchmarks.load_loki(gt):
        name = entry.file_name
        item = items.get(name)
        if item is None:
            path = _safe_image_path(Path(image_dir), name) if image_dir is not None else None
            item = items[name] = GroundTruthItem(
                name=name,
                size=image_size(path) if path else None,
                path=str(path) if path else None,
                boxes=[],
                boxes_skip_degenerate=skip_degenerate,
                raster=raster,
            )
        item.boxes.extend(entry.regions)
        if not item.reference_text and entry.global_desc:
            item.reference_text = _normalise_space(entry.global_desc)
    return items


def load_richhf(gt: str | os.PathLike, threshold: float = 0.0) -> dict[str, GroundTruthItem]:
    """RichHF-18K ground truth: ``gt`` = the ``raw_imgs`` image folder; each image's heatmap
    (``raw_imgs`` -> ``heatmaps``) > ``threshold`` at the image's own size. Images without a
    heatmap are not ground truth (warned)."""
    from legion.data import benchmarks

    gt = Path(gt)
    if not gt.is_dir():
        raise InputNotFoundError(f"--gt {gt}: RichHF-18K needs the raw_imgs image folder")
    entries, no_heatmap = benchmarks.list_richhf_items(gt)
    if no_heatmap:
        warnings.warn(
            f"{len(no_heatmap)} RichHF images have no heatmap and are not evaluated (e.g. {no_heatmap[0].name})",
            stacklevel=2,
        )
    items: dict[str, GroundTruthItem] = {}
    for entry in entries:
        size = image_size(entry.image_path)
        if size is None:
            raise DataError(f"{entry.image_path}: unreadable image")
        mask = benchmarks.richhf_mask(entry.heatmap_path, threshold=threshold, expected_size=size)
        items[entry.image_path.name] = GroundTruthItem(
            name=entry.image_path.name, size=size, union_rle=mask_to_rle(mask), path=str(entry.image_path)
        )
    return items


def load_ground_truth(
    gt: str | os.PathLike,
    dataset: str,
    split: str = "test",
    image_dir: str | os.PathLike | None = None,
    loki_skip_degenerate: bool = False,
    raster: str = "paper",
) -> dict[str, GroundTruthItem]:
    """Dispatch on ``dataset`` -> ``{file name: GroundTruthItem}``. ``gt`` is: synthscars = dataset
    root or annotation JSON; loki = the UTF-16 annotation JSON; richhf = the ``raw_imgs`` folder.
    ``raster`` applies to SynthScars polygons and LOKI boxes (RichHF heatmaps are pixels already)."""
    if dataset == "synthscars":
        return load_synthscars(gt, split=split, image_dir=image_dir, raster=raster)
    if dataset == "loki":
        return load_loki(gt, image_dir=image_dir, skip_degenerate=loki_skip_degenerate, raster=raster)
    if dataset == "richhf":
        return load_richhf(gt)
    raise ValueError(f"unknown dataset {dataset!r}; choose one of {', '.join(DATASETS)}")


# --------------------------------------------------------------------------- predictions


def read_predictions(path: str | os.PathLike) -> list[PredictionRecord]:
    """Prediction records from a ``predictions.jsonl`` file (docs/ARCHITECTURE.md), or from a
    folder in the reference layout (``<dir>/<image file name>/mask.png`` + ``explanation.json``).

    JSONL: blank lines are skipped; a malformed line raises with its line number."""
    path = Path(path)
    if path.is_dir():
        return read_reference_layout(path)
    records = []
    for lineno, data in enumerate(read_jsonl(path, require=("image",)), 1):
        try:
            records.append(PredictionRecord.from_json(data))
        except (TypeError, ValueError) as exc:
            raise DataError(f"{path}: record {lineno}: {exc}") from None
    return records


def as_record(record: PredictionRecord | dict) -> PredictionRecord:
    """A prediction record, from the typed class or its JSON object."""
    return record if isinstance(record, PredictionRecord) else PredictionRecord.from_json(record)


def read_reference_layout(folder: str | os.PathLike) -> list[PredictionRecord]:
    """Records from the reference ``infer.py`` output: one sub-folder per image named after the
    image file, holding ``mask.png`` (union mask, 0/255) and ``explanation.json``
    (``{"<image path>": "<explanation>"}``). Per-phrase masks are not in that layout."""
    from PIL import Image

    records = []
    for sub in sorted(p for p in Path(folder).iterdir() if p.is_dir()):
        mask_path, exp_path = sub / "mask.png", sub / "explanation.json"
        if not mask_path.is_file() and not exp_path.is_file():
            continue
        rec = PredictionRecord(image=sub.name, verdict="fake")
        if exp_path.is_file():
            with open(exp_path, encoding="utf-8") as fh:
                texts = json.load(fh)
            rec.explanation = next(iter(texts.values()), "") if isinstance(texts, dict) else str(texts)
        if mask_path.is_file():
            with Image.open(mask_path) as im:
                mask = np.asarray(im.convert("L")) > 0
            rec.width, rec.height, rec.union_mask = int(mask.shape[1]), int(mask.shape[0]), mask_to_rle(mask)
        records.append(rec)
    if not records:
        raise DataError(f"{folder}: no <image>/mask.png or explanation.json sub-folders (reference layout)")
    return records


@dataclass
class Matching:
    """Predictions paired with ground-truth names."""

    by_name: dict[str, PredictionRecord]  # GT name -> prediction record
    missing: list[str]  # GT names without a prediction (scored as empty)
    extra: list[str]  # prediction images with no ground truth (not scored)
    duplicates: list[str]  # GT names predicted more than once (the last one is kept; `check_matching` refuses)
    foreign: list[str] = field(default_factory=list)  # predictions of other images with a GT name (not matched)
    duplicate_images: dict[str, list[str]] = field(default_factory=dict)  # GT name -> the records' images
    image_root: str | None = None  # the folder the predictions' images are relative to, when known


def same_image(a: str | os.PathLike, b: str | os.PathLike) -> bool | None:
    """True when `a` and `b` are the same file or hold the same bytes, False when they differ, None when
    either cannot be read (then only the names can be compared)."""
    import filecmp

    try:
        return os.path.samefile(a, b) or filecmp.cmp(a, b, shallow=False)
    except OSError:
        return None


def match_predictions(
    predictions: Iterable[PredictionRecord | dict],
    ground_truth: Mapping[str, GroundTruthItem],
    image_root: str | os.PathLike | None = None,
) -> Matching:
    """Pair prediction records with ground-truth names (module docstring). With `image_root` (the folder
    the predictions' ``image`` paths are relative to), a record whose image is a different picture than the
    ground truth's image file of that name (`GroundTruthItem.path`) is not matched but listed in `foreign`."""
    names = list(ground_truth)
    name_set = set(names)
    by_base: dict[str, list[str]] = {}
    for n in names:
        by_base.setdefault(os.path.basename(n), []).append(n)
    by_name: dict[str, dict] = {}
    extra, duplicates, foreign = [], [], []
    images: dict[str, list[str]] = {}
    for rec in map(as_record, predictions):
        image = str(rec.image).replace("\\", "/")
        if image in name_set:
            key = image
        else:
            candidates = by_base.get(os.path.basename(image), [])
            key = candidates[0] if len(candidates) == 1 else None
        if key is None:
            extra.append(image)
            continue
        gt_path = ground_truth[key].path
        if image_root is not None and gt_path and same_image(Path(image_root) / image, gt_path) is False:
            foreign.append(image)
            continue
        images.setdefault(key, []).append(image)
        if key in by_name:
            duplicates.append(key)
        by_name[key] = rec
    missing = [n for n in names if n not in by_name]
    return Matching(
        by_name=by_name,
        missing=missing,
        extra=extra,
        duplicates=duplicates,
        foreign=foreign,
        duplicate_images={k: images[k] for k in dict.fromkeys(duplicates)},
        image_root=None if image_root is None else str(image_root),
    )


def check_matching(matching: Matching) -> None:
    """Refuse what cannot be scored honestly: several records for one image (which one would count?) and
    predictions made on other images that carry ground-truth names. DataError naming them."""
    if matching.duplicate_images:
        shown = "; ".join(
            f"{len(images)} records for {name}" + (f" ({', '.join(images)})" if set(images) != {name} else "")
            for name, images in list(matching.duplicate_images.items())[:5]
        )
        more = len(matching.duplicate_images) - 5
        raise DataError(
            f"the predictions hold more than one record for {len(matching.duplicate_images)} image(s): {shown}"
            + (f" and {more} more" if more > 0 else "")
            + "; a predictions file has one record per image (write each run to its own output_dir)"
        )
    if matching.foreign:
        shown = ", ".join(matching.foreign[:5]) + (", ..." if len(matching.foreign) > 5 else "")
        raise DataError(
            f"{len(matching.foreign)} predictions are for other images than the ground truth's of the same name "
            f"(made on {matching.image_root}: {shown}); evaluate predictions made on the ground-truth images"
        )


def check_record_masks(record: PredictionRecord) -> None:
    """DataError naming the image when one of the record's masks is not a well-formed RLE (legion.utils.rle:
    malformed run lengths would hang pycocotools or give a wrong area)."""
    from legion.utils.rle import check_rle

    if not isinstance(record.masks, list):
        raise DataError(f"prediction for {record.image}: masks is not a list")
    for i, rle in enumerate(record.masks):
        check_rle(rle, f"prediction for {record.image}: masks[{i}]")
    if record.union_mask is not None:
        check_rle(record.union_mask, f"prediction for {record.image}: union_mask")


def prediction_image_root(pred_path: str | os.PathLike) -> Path | None:
    """The folder the images of a `legion infer` output are relative to: the absolute ``image_dir`` that infer
    recorded in the ``infer_fingerprint.json`` next to ``predictions.jsonl``; without one (an older version of
    legion), ``image_dir`` of the ``infer_config.yaml`` there (else the folder of its ``image_list``), as
    written (a relative one is taken relative to the current folder); None when there is neither (predictions
    written by other tools)."""
    import yaml

    pred_path = Path(pred_path)
    folder = pred_path if pred_path.is_dir() else pred_path.parent
    try:
        settings = json.loads((folder / "infer_fingerprint.json").read_text(encoding="utf-8")).get("settings")
        if isinstance(settings, dict) and settings.get("image_dir"):
            return Path(str(settings["image_dir"]))
    except (json.JSONDecodeError, UnicodeDecodeError, AttributeError, OSError):
        pass
    config = folder / "infer_config.yaml"
    if not config.is_file():
        return None
    try:
        data = yaml.safe_load(config.read_text(encoding="utf-8")) or {}
    except (yaml.YAMLError, UnicodeDecodeError, OSError):
        return None
    if not isinstance(data, dict):
        return None
    if data.get("image_dir"):
        return Path(str(data["image_dir"]))
    if data.get("image_list"):
        return Path(str(data["image_list"])).parent
    return None
