"""Ground truth of the cross-domain localization benchmarks (docs/data_formats.md §8.2, §8.3).

LOKI: UTF-16 JSON list; each item has `image_path`, `problems.regional[i].region = [x, y, w, h]`
(pixels) and `problems.global[0].desc`. GT mask = union of the regions as the reference draws them:
x1=int(x), y1=int(y), x2=int(x+w), y2=int(y+h) (truncation), x1,y1 clipped to >= 0, x2 to <= W-1,
y2 to <= H-1, filled rectangle *inclusive* of both corners (cv2.rectangle, thickness -1).
ArtiAgent's variant additionally skips boxes with x2 <= x1 or y2 <= y1 (`skip_degenerate=True`).

RichHF-18K: per image a grayscale artifact heatmap at the image path with the folder `raw_imgs`
replaced by `heatmaps`; GT = heatmap/255 > threshold (reference: threshold 0, native size;
ArtiAgent: LANCZOS resize to 512 first). Heatmap and image must have the same size.

Items are matched to predictions by exact file name (never by substring, as the reference did; docs/reproduce.md §6).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path, PurePath

import cv2
import numpy as np
from PIL import Image

from legion.data.images import is_image_file
from legion.errors import LegionError


class BenchmarkFormatError(LegionError, ValueError):
    """A benchmark annotation that cannot be used; the message names the item and field."""


# --- LOKI ------------------------------------------------------------------------------------
@dataclass
class LokiItem:
    index: int  # position in the annotation list
    image_path: str
    regions: list[list[float]]  # [x, y, w, h] boxes in pixels
    global_desc: str | None = None  # problems.global[0].desc (explanation reference)
    region_descs: list[str | None] = field(default_factory=list)

    @property
    def file_name(self) -> str:
        return _base_name(self.image_path)


def _base_name(path: str) -> str:
    return path.replace("\\", "/").rstrip("/").rsplit("/", 1)[-1]


def load_loki(path: str | os.PathLike, encoding: str = "utf-16") -> list[LokiItem]:
    """Read LOKI's annotation list (UTF-16 JSON by default, as the reference opens it)."""
    try:
        with open(path, encoding=encoding) as fh:
            data = json.load(fh)
    except UnicodeError as err:
        raise BenchmarkFormatError(f"{path}: not {encoding} text ({err}); LOKI annotations are UTF-16 JSON") from None
    except json.JSONDecodeError as err:
        raise BenchmarkFormatError(
            f"{path}: malformed JSON at line {err.lineno}, column {err.colno}: {err.msg}"
        ) from None
    if not isinstance(data, list):
        raise BenchmarkFormatError(f"{path}: top level is a {type(data).__name__}, expected a list of items")
    items = []
    for index, raw in enumerate(data):
        where = f"{path}: item {index}"
        if not isinstance(raw, dict) or not isinstance(raw.get("image_path"), str):
            raise BenchmarkFormatError(f"{where}: missing string field 'image_path'")
        problems = raw.get("problems") or {}
        if not isinstance(problems, dict):
            raise BenchmarkFormatError(f"{where} ({raw['image_path']}): 'problems' is not an object")
        regions, descs = [], []
        for j, region in enumerate(problems.get("regional") or []):
            box = region.get("region") if isinstance(region, dict) else None
            if not (
                isinstance(box, list)
                and len(box) == 4
                and all(isinstance(v, (int, float)) and not isinstance(v, bool) and np.isfinite(v) for v in box)
            ):
                raise BenchmarkFormatError(
                    f"{where} ({raw['image_path']}): problems.regional[{j}].region must be 4 numbers [x, y, w, h], "
                    f"got {box!r}"
                )
            regions.append([float(v) for v in box])
            descs.append(region.get("desc") if isinstance(region.get("desc"), str) else None)
        global_desc = None
        glob = problems.get("global")
        if isinstance(glob, list) and glob and isinstance(glob[0], dict) and isinstance(glob[0].get("desc"), str):
            global_desc = glob[0]["desc"]
        items.append(LokiItem(index, raw["image_path"], regions, global_desc, descs))
    return items


def loki_box_mask(regions: list[list[float]], height: int, width: int, skip_degenerate: bool = False) -> np.ndarray:
    """uint8 {0,1} [H, W]: union of inclusive, clipped, int-truncated [x, y, w, h] rectangles."""
    mask = np.zeros((height, width), dtype=np.uint8)
    for x, y, w, h in regions:
        x1, y1, x2, y2 = int(x), int(y), int(x + w), int(y + h)
        x1, y1 = max(x1, 0), max(y1, 0)
        x2, y2 = min(x2, width - 1), min(y2, height - 1)
        if skip_degenerate and (x2 <= x1 or y2 <= y1):
            continue
        cv2.rectangle(mask, (x1, y1), (x2, y2), 1, thickness=-1)
    return mask


def find_loki_items(items: list[LokiItem], file_name: str) -> list[LokiItem]:
    """Items whose image has exactly this file name (all of them: duplicates are unioned by callers)."""
    name = _base_name(file_name)
    return [item for item in items if item.file_name == name]


def loki_gt_mask(
    items: list[LokiItem], file_name: str, height: int, width: int, skip_degenerate: bool = False
) -> np.ndarray:
    matches = find_loki_items(items, file_name)
    if not matches:
        raise KeyError(f"no LOKI item for image {file_name!r}")
    regions = [box for item in matches for box in item.regions]
    return loki_box_mask(regions, height, width, skip_degenerate)


# --- RichHF-18K ------------------------------------------------------------------------------
def richhf_heatmap_path(
    image_path: str | os.PathLike, raw_dir: str = "raw_imgs", heatmap_dir: str = "heatmaps"
) -> Path:
    """The heatmap next to an image: the last path folder named `raw_dir` becomes `heatmap_dir`."""
    parts = list(PurePath(image_path).parts)
    folders = [i for i, part in enumerate(parts[:-1]) if part == raw_dir]
    if not folders:
        raise BenchmarkFormatError(f"{image_path}: no '{raw_dir}' folder in the path to replace by '{heatmap_dir}'")
    parts[folders[-1]] = heatmap_dir
    return Path(*parts)


def richhf_mask(
    heatmap_path: str | os.PathLike,
    threshold: float = 0.0,
    resize_to: int | None = None,
    expected_size: tuple[int, int] | None = None,
) -> np.ndarray:
    """uint8 {0,1} mask = heatmap (grayscale, scaled to [0, 1]) > threshold.

    resize_to: square side to LANCZOS-resize the heatmap to before thresholding (ArtiAgent: 512).
    expected_size: (H, W) of the image; a heatmap of another size raises (the reference's F1 did).
    """
    with Image.open(heatmap_path) as img:
        heat = img.convert("L")
        if expected_size is not None and resize_to is None and heat.size != (expected_size[1], expected_size[0]):
            raise BenchmarkFormatError(
                f"{heatmap_path}: heatmap is {heat.size[0]}x{heat.size[1]}, image is "
                f"{expected_size[1]}x{expected_size[0]}"
            )
        if resize_to is not None:
            heat = heat.resize((resize_to, resize_to), Image.Resampling.LANCZOS)
        values = np.asarray(heat, dtype=np.float32) / 255.0
    return (values > threshold).astype(np.uint8)


@dataclass
class RichHFItem:
    image_path: Path
    heatmap_path: Path


def list_richhf_items(
    image_dir: str | os.PathLike, raw_dir: str = "raw_imgs", heatmap_dir: str = "heatmaps"
) -> tuple[list[RichHFItem], list[Path]]:
    """(items with a heatmap, images without one) for the images in `image_dir`, sorted by name."""
    images = sorted(p for p in Path(image_dir).iterdir() if p.is_file() and is_image_file(p))
    items, missing = [], []
    for image in images:
        heatmap = richhf_heatmap_path(image, raw_dir, heatmap_dir)
        (items.append(RichHFItem(image, heatmap)) if heatmap.is_file() else missing.append(image))
    return items, missing
