"""What the controller loops share: input cases, the LEGION analyser config, masks from a
prediction record, and the per-case output folder.

Input files (`read_cases`)
- `.txt`: one prompt per line (no starting image); blank lines and `#` comments skipped.
- `.json`: a mapping `{image: prompt}` (docs/metrics.md §7: pre and post are scored against this
  prompt), or a list of objects `{"prompt": ..., "image": ..., "id": ...}` (image and id optional).
- `.jsonl`: one such object per line.
Image paths are relative to `image_root` (default: the input file's folder) and may not leave it.

Output folder of one case (`CaseWriter`)

    <out>/cases/<case_id>/round_00/image.png     the image of this round
                                   prompt.txt    the prompt that made it (round 0: the original)
                                   analysis.json LEGION's record + score + round facts
                                   mask_union.png, mask_00.png ... (LEGION masks, 0/255)
                                   mask_inpaint.png (inpainting: the dilated mask that made this image)
"""

from __future__ import annotations

import dataclasses
import json
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from legion.errors import UsageError
from legion.infer import AnalyzerConfig
from legion.record import PredictionRecord
from legion.utils.io import atomic_write_png, atomic_write_text


class CaseError(UsageError, ValueError):
    """An input file or entry the controller cannot use (exit code 2)."""


@dataclass
class Case:
    case_id: str
    prompt: str
    image_path: Path | None = None


_SAFE = re.compile(r"[^A-Za-z0-9._-]+")


def _safe_id(text: str, used: set[str]) -> str:
    base = _SAFE.sub("_", text).strip("._") or "case"
    base = base[:80]
    case_id, k = base, 1
    while case_id in used:
        k += 1
        case_id = f"{base}_{k}"
    used.add(case_id)
    return case_id


def _resolve_image(name: str, root: Path, allow_absolute: bool) -> Path:
    path = Path(name)
    if path.is_absolute():
        if not allow_absolute:
            raise CaseError(f"absolute image path '{name}' not allowed (set allow_absolute_paths=true)")
        resolved = path.resolve()
    else:
        resolved = (root / path).resolve()
        if not resolved.is_relative_to(root.resolve()):
            raise CaseError(f"image path '{name}' leaves the image root {root}")
    if not resolved.is_file():
        raise CaseError(f"image not found: {resolved}")
    return resolved


def read_cases(
    path: str | Path,
    image_root: str | Path | None = None,
    allow_absolute: bool = False,
    require_images: bool = False,
    limit: int | None = None,
) -> list[Case]:
    """Parse an input file into cases (see the module docstring for the formats)."""
    path = Path(path)
    if not path.is_file():
        raise CaseError(f"input file not found: {path}")
    root = Path(image_root) if image_root else path.parent
    entries: list[dict] = []
    if path.suffix == ".txt":
        for line in path.read_text(encoding="utf-8").splitlines():
            if line.strip() and not line.lstrip().startswith("#"):
                entries.append({"prompt": line.strip()})
    elif path.suffix == ".jsonl":
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if line.strip():
                try:
                    entries.append(json.loads(line))
                except json.JSONDecodeError as exc:
                    raise CaseError(f"{path}:{number}: not JSON: {exc}") from None
    elif path.suffix == ".json":
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as exc:
            raise CaseError(f"{path}: not JSON: {exc}") from None
        if isinstance(data, dict):
            entries = [{"image": k, "prompt": v} for k, v in data.items()]
        elif isinstance(data, list):
            entries = data
        else:
            raise CaseError(f"{path}: expected a mapping {{image: prompt}} or a list of objects")
    else:
        raise CaseError(f"{path}: unsupported input format '{path.suffix}' (use .txt, .json or .jsonl)")

    cases, used = [], set()
    for number, entry in enumerate(entries, 1):
        if not isinstance(entry, dict) or not isinstance(entry.get("prompt"), str) or not entry["prompt"].strip():
            raise CaseError(f"{path}: entry {number} has no non-empty 'prompt'")
        image = entry.get("image")
        if require_images and not image:
            raise CaseError(f"{path}: entry {number} has no 'image' (this command needs one per prompt)")
        image_path = _resolve_image(str(image), root, allow_absolute) if image else None
        default_id = Path(str(image)).stem if image else f"prompt_{number:04d}"
        cases.append(Case(_safe_id(str(entry.get("id") or default_id), used), entry["prompt"].strip(), image_path))
        if limit and len(cases) >= limit:
            break
    if not cases:
        raise CaseError(f"{path}: no cases")
    return cases


def load_analyzer(cfg: AnalyzerConfig, device: str):
    """The real LEGION analyser, loaded once through `Analyzer.from_config` (the same keys as `legion infer`);
    `device` (the controller's) is used unless the `legion:` section names its own."""
    from legion.infer import Analyzer

    return Analyzer.from_config(cfg if cfg.device != "auto" else dataclasses.replace(cfg, device=device))


# ---------------------------------------------------------------- masks from a prediction record


def _fit(mask: np.ndarray, height: int, width: int) -> np.ndarray:
    if mask.shape == (height, width):
        return mask
    import cv2

    return cv2.resize(mask, (width, height), interpolation=cv2.INTER_NEAREST)


def record_masks(record: PredictionRecord, height: int, width: int) -> tuple[np.ndarray, list[np.ndarray], list[str]]:
    """(union uint8 {0,1} [H, W], per-phrase masks, notes) from a LEGION prediction record.

    Per-phrase fallback (the reference dropped the whole image when one phrase failed to parse):
    a phrase mask that is missing or does not decode is skipped with a note, and when the record's
    union mask is absent or broken the union is rebuilt from the phrase masks that did decode.
    """
    from legion.utils.rle import rle_to_mask

    notes: list[str] = []
    per_phrase: list[np.ndarray] = []
    for k, rle in enumerate(record.masks or []):
        try:
            per_phrase.append(_fit((rle_to_mask(rle) > 0).astype(np.uint8), height, width))
        except Exception as exc:  # a malformed RLE must not sink the other phrases
            notes.append(f"mask {k} skipped: {type(exc).__name__}: {exc}")
    union = None
    if record.union_mask:
        try:
            union = _fit((rle_to_mask(record.union_mask) > 0).astype(np.uint8), height, width)
        except Exception as exc:
            notes.append(f"union mask rebuilt from phrase masks: {type(exc).__name__}: {exc}")
    if union is None:
        union = np.zeros((height, width), np.uint8)
        for mask in per_phrase:
            union |= mask
    return union, per_phrase, notes


def has_artifact(record: PredictionRecord, union: np.ndarray) -> bool:
    """LEGION found something to fix: a fake verdict with at least one masked pixel."""
    return record.verdict == "fake" and bool(union.any())


# ---------------------------------------------------------------- output folder


def save_png(array: np.ndarray, path: Path) -> None:
    if array.ndim == 2:  # {0,1} mask -> 0/255 grey
        array = (array > 0).astype(np.uint8) * 255
    atomic_write_png(path, array)


class CaseWriter:
    """Writes every round of one case under <out>/cases/<case_id>/round_XX/."""

    def __init__(self, out_dir: str | Path, case_id: str):
        self.out_dir = Path(out_dir)
        self.case_dir = self.out_dir / "cases" / case_id

    def write_round(
        self,
        index: int,
        image: np.ndarray,
        prompt: str,
        record: PredictionRecord,
        score: float,
        union: np.ndarray,
        phrase_masks: list[np.ndarray],
        facts: dict,
        inpaint_mask: np.ndarray | None = None,
    ) -> dict:
        """Write one round; returns its summary entry (paths relative to the output root)."""
        folder = self.case_dir / f"round_{index:02d}"
        folder.mkdir(parents=True, exist_ok=True)
        save_png(image, folder / "image.png")
        atomic_write_text(folder / "prompt.txt", prompt + "\n")
        save_png(union, folder / "mask_union.png")
        for k, mask in enumerate(phrase_masks):
            save_png(mask, folder / f"mask_{k:02d}.png")
        if inpaint_mask is not None:
            save_png(inpaint_mask, folder / "mask_inpaint.png")
        entry = {
            "round": index,
            "prompt": prompt,
            "score": score,
            "verdict": record.verdict,
            "fake_prob": record.fake_prob,
            "explanation": record.explanation or "",
            "phrases": list(record.phrases or []),
            "artifact_fraction": float(union.mean()) if union.size else 0.0,  # the reference's `par`
            "image": (folder / "image.png").relative_to(self.out_dir).as_posix(),
            "mask": (folder / "mask_union.png").relative_to(self.out_dir).as_posix(),
            **facts,
        }
        analysis = {"round": entry, "record": record.to_json()}
        atomic_write_text(folder / "analysis.json", json.dumps(analysis, indent=2, default=_json_default))
        return entry


def _json_default(value):
    if isinstance(value, (np.integer, np.floating)):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    return str(value)
