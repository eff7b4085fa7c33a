"""COCO run-length encoding of binary masks (pycocotools), shared by inference and evaluation.

An RLE here is the JSON-friendly dict ``{"size": [h, w], "counts": str}`` (column-major counts,
compressed as pycocotools does). Masks are ``np.uint8`` arrays ``[H, W]`` with values {0, 1}.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from pycocotools import mask as coco_mask


def mask_to_rle(mask: np.ndarray) -> dict:
    """Encode a binary mask ``[H, W]`` (bool or any number type; nonzero = foreground) as RLE."""
    mask = np.asarray(mask)
    if mask.ndim != 2:
        raise ValueError(f"mask_to_rle expects a 2-D mask [H, W], got shape {mask.shape}")
    rle = coco_mask.encode(np.asfortranarray(mask != 0, dtype=np.uint8))
    return {"size": [int(rle["size"][0]), int(rle["size"][1])], "counts": rle["counts"].decode("ascii")}


def _to_coco(rle: dict) -> dict:
    """JSON RLE -> the form pycocotools functions take (bytes counts; uncompressed lists compressed)."""
    if not isinstance(rle, dict) or "size" not in rle or "counts" not in rle:
        raise ValueError(f"not a COCO RLE dict with 'size' and 'counts': {str(rle)[:80]}")
    h, w = (int(v) for v in rle["size"])
    counts = rle["counts"]
    if isinstance(counts, list):  # uncompressed RLE (COCO iscrowd style)
        return coco_mask.frPyObjects({"size": [h, w], "counts": counts}, h, w)
    if isinstance(counts, str):
        counts = counts.encode("ascii")
    return {"size": [h, w], "counts": counts}


def rle_to_mask(rle: dict) -> np.ndarray:
    """Decode an RLE dict to a ``np.uint8`` mask ``[h, w]`` with values {0, 1}."""
    return np.ascontiguousarray(coco_mask.decode(_to_coco(rle)))


def rle_size(rle: dict) -> tuple[int, int]:
    """``(h, w)`` of an RLE without decoding it."""
    return int(rle["size"][0]), int(rle["size"][1])


def rle_area(rle: dict) -> int:
    """Number of foreground pixels, computed on the run lengths (no decoding)."""
    return int(coco_mask.area(_to_coco(rle)))


def rle_union(rles: Sequence[dict], size: tuple[int, int] | None = None) -> dict:
    """Union of RLEs of the same size, on the run lengths. An empty list needs ``size`` and
    gives an empty mask."""
    if not rles:
        if size is None:
            raise ValueError("rle_union of no masks needs a size")
        return mask_to_rle(np.zeros(size, dtype=np.uint8))
    coco = [_to_coco(r) for r in rles]
    sizes = {tuple(c["size"]) for c in coco}
    if len(sizes) != 1:
        raise ValueError(f"rle_union: masks of different sizes {sorted(sizes)}")
    merged = coco[0] if len(coco) == 1 else coco_mask.merge(coco, intersect=0)
    counts = merged["counts"]
    return {
        "size": [int(v) for v in merged["size"]],
        "counts": counts.decode("ascii") if isinstance(counts, bytes) else counts,
    }


def rle_intersection_area(a: dict, b: dict) -> int:
    """|a ∧ b| on the run lengths (no decoding); both masks must have the same size."""
    ca, cb = _to_coco(a), _to_coco(b)
    if list(ca["size"]) != list(cb["size"]):
        raise ValueError(f"rle_intersection_area: sizes differ {list(ca['size'])} vs {list(cb['size'])}")
    return int(coco_mask.area(coco_mask.merge([ca, cb], intersect=1)))
