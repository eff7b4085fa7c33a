"""Real/fake detection data: UniversalFakeDetect / CNNDetection folders and the reference JSON lists.

Two on-disk forms describe the same thing, a list of (image, is_fake, subset):

Folders (public CNNDetection / UniversalFakeDetect releases)::

    root/<subset>/0_real/*.png              single-class subset   (e.g. biggan, guided, ldm_200)
    root/<subset>/1_fake/*.png
    root/<subset>/<class>/0_real/*.png      multi-class subset    (e.g. progan, stylegan, cyclegan)
    root/<subset>/<class>/1_fake/*.png

The subset is the first folder below `root`. When `root` holds `0_real`/`1_fake` itself, it is one
subset named after `root`. A multi-class folder given as root, such as the CNNDetection training
folder `progan_train/<class>/...`, therefore reads as one subset per LSUN class.

JSON lists (the reference `scripts/cls`; docs/data_formats.md §8.4)::

    train: [{"image_path": "rel/path.png", "label": "real" | <anything else>}, ...]
    test:  [{"image": "rel/path.png", "label": "real" | ..., "category": "biggan"}, ...]

LABEL MAPPING. The reference uses class index **1 = real, 0 = fake** (label string "real" -> 1,
anything else -> 0), the opposite of the `0_real` / `1_fake` folder names. We never carry either
integer convention around: every item holds an explicit boolean `is_fake`.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from legion.errors import LegionError

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff")
REAL_DIR, FAKE_DIR = "0_real", "1_fake"
# Reference label strings: exactly "real" means real; every other string means fake.
REFERENCE_REAL_LABEL = "real"


class DetectionDataError(LegionError, ValueError):
    """A detection folder or list that cannot be read as real/fake data."""


@dataclass(frozen=True)
class DetectionItem:
    path: str  # absolute (or as resolved against the data root) image path
    is_fake: bool  # ground truth; True = synthetic
    subset: str  # generator / category name used for per-subset accuracy


def reference_label_to_is_fake(label: object) -> bool:
    """Reference JSON label -> is_fake. "real" is real (reference index 1); any other string is fake."""
    if not isinstance(label, str):
        raise DetectionDataError(
            f"label {label!r}: the reference JSON format uses strings ('real' or a fake label); "
            "integer labels are ambiguous (the reference's index 1 means real, the folders' 1 means fake)"
        )
    return label != REFERENCE_REAL_LABEL


def is_fake_to_reference_index(is_fake: bool) -> int:
    """is_fake -> the reference's class index (0 = fake, 1 = real)."""
    return 0 if is_fake else 1


def _is_image(name: str) -> bool:
    return not name.startswith(".") and name.lower().endswith(IMAGE_EXTENSIONS)


def _images_in(folder: Path) -> list[Path]:
    """Images under `folder`, recursively, sorted (some releases nest one more level)."""
    found = []
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=True):
        dirnames.sort()
        found.extend(Path(dirpath) / f for f in sorted(filenames) if _is_image(f))
    return found


def _label_dirs(root: Path) -> list[Path]:
    """Every `0_real` / `1_fake` directory under root (not descending into them), sorted."""
    found = []
    for dirpath, dirnames, _ in os.walk(root, followlinks=True):
        dirnames.sort()
        here = [d for d in dirnames if d in (REAL_DIR, FAKE_DIR)]
        found.extend(Path(dirpath) / d for d in here)
        dirnames[:] = [d for d in dirnames if d not in (REAL_DIR, FAKE_DIR) and not d.startswith(".")]
    return found


def list_folder_images(root: str | os.PathLike, subsets: Iterable[str] | None = None) -> list[DetectionItem]:
    """Walk a `<subset>/[<class>/]0_real|1_fake` tree. The subset is the first folder below root."""
    root = Path(root)
    if not root.is_dir():
        raise DetectionDataError(f"detection folder not found: {root}")
    wanted = set(subsets) if subsets else None
    items: list[DetectionItem] = []
    for label_dir in _label_dirs(root):
        rel = label_dir.relative_to(root).parts
        subset = rel[0] if len(rel) > 1 else root.resolve().name
        if wanted is not None and subset not in wanted:
            continue
        is_fake = label_dir.name == FAKE_DIR
        items.extend(DetectionItem(str(p), is_fake, subset) for p in _images_in(label_dir))
    if not items:
        raise DetectionDataError(
            f"{root}: no images in any '{REAL_DIR}' / '{FAKE_DIR}' folder"
            + (f" of subsets {sorted(wanted)}" if wanted else "")
            + " (expected <subset>/[<class>/]0_real|1_fake/)"
        )
    if wanted is not None and (missing := wanted - {it.subset for it in items}):
        raise DetectionDataError(f"{root}: subsets not found: {sorted(missing)}")
    return items


def _read_json_list(path: Path) -> list[dict]:
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".jsonl":
        rows = [json.loads(line) for line in text.splitlines() if line.strip()]
    else:
        rows = json.loads(text)
    if not isinstance(rows, list) or not all(isinstance(r, dict) for r in rows):
        raise DetectionDataError(f"{path}: expected a JSON list of objects")
    return rows


def _resolve_inside(base: Path, name: str, where: str, allow_absolute: bool) -> Path:
    """`base/name`, refusing absolute names and `..` escapes unless explicitly allowed."""
    candidate = Path(name)
    if candidate.is_absolute():
        if not allow_absolute:
            raise DetectionDataError(f"{where}: absolute image path {name!r} (pass allow_absolute=True to accept)")
        return candidate
    resolved = (base / candidate).resolve()
    if not allow_absolute and not resolved.is_relative_to(base.resolve()):
        raise DetectionDataError(f"{where}: image path {name!r} escapes the data root {base}")
    return resolved


def list_json_images(
    json_path: str | os.PathLike,
    data_base: str | os.PathLike | None = None,
    subsets: Iterable[str] | None = None,
    allow_absolute: bool = False,
) -> list[DetectionItem]:
    """Read a reference JSON list (train `image_path`/`label` or test `image`/`label`/`category`).

    Image paths are relative to `data_base` (default: the JSON file's folder). Items without a
    `category` belong to a subset named after the JSON file.
    """
    json_path = Path(json_path)
    if not json_path.is_file():
        raise DetectionDataError(f"detection list not found: {json_path}")
    base = Path(data_base) if data_base is not None else json_path.parent
    wanted = set(subsets) if subsets else None
    items = []
    for i, row in enumerate(_read_json_list(json_path)):
        where = f"{json_path}[{i}]"
        name = row.get("image_path", row.get("image"))
        if not isinstance(name, str) or not name:
            raise DetectionDataError(f"{where}: needs an 'image_path' (train list) or 'image' (test list) string")
        if "label" not in row:
            raise DetectionDataError(f"{where}: missing 'label'")
        try:
            is_fake = reference_label_to_is_fake(row["label"])
        except DetectionDataError as exc:
            raise DetectionDataError(f"{where}: {exc}") from None
        subset = str(row.get("category", json_path.stem))
        if wanted is not None and subset not in wanted:
            continue
        items.append(DetectionItem(str(_resolve_inside(base, name, where, allow_absolute)), is_fake, subset))
    if not items:
        raise DetectionDataError(f"{json_path}: no items" + (f" in subsets {sorted(wanted)}" if wanted else ""))
    return items


def list_detection_images(
    root_or_json: str | os.PathLike,
    data_base: str | os.PathLike | None = None,
    subsets: Iterable[str] | None = None,
    allow_absolute: bool = False,
) -> list[DetectionItem]:
    """Items of a detection folder tree or a reference JSON / JSONL list (see module docstring).

    `subsets` keeps only the named subsets; `data_base` and `allow_absolute` apply to JSON lists.
    """
    path = Path(root_or_json)
    if path.is_dir():
        if data_base is not None:
            raise DetectionDataError(f"{path} is a folder: data_base applies only to JSON lists")
        return list_folder_images(path, subsets)
    if path.suffix in (".json", ".jsonl"):
        return list_json_images(path, data_base, subsets, allow_absolute)
    raise DetectionDataError(f"{path}: not a folder nor a .json/.jsonl list")


def summarize(items: list[DetectionItem]) -> dict[str, dict[str, int]]:
    """{subset: {"real": n, "fake": n}} in first-seen order (for logs and sanity checks)."""
    counts: dict[str, dict[str, int]] = {}
    for it in items:
        c = counts.setdefault(it.subset, {"real": 0, "fake": 0})
        c["fake" if it.is_fake else "real"] += 1
    return counts
