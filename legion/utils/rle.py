"""COCO run-length encoding of binary masks (pycocotools), shared by inference and evaluation.

An RLE here is the JSON-friendly dict ``{"size": [h, w], "counts": str}`` (column-major counts,
compressed as pycocotools does). Masks are ``np.uint8`` arrays ``[H, W]`` with values {0, 1}.

pycocotools trusts its input: run lengths that do not add up to h x w make ``merge`` loop forever
and ``decode`` write past its buffer. `rle_problem` / `check_rle` validate an RLE read from a file
(sane size, well-formed counts, counts adding up to h x w) in O(len(counts)) without decoding;
`rle_to_mask` checks before decoding, and evaluation checks every prediction once when it reads it.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from pycocotools import mask as coco_mask

from legion.errors import DataError

MAX_SIDE = 100_000  # pixels per side; h x w must also fit pycocotools' 32-bit unsigned counts
_MAX_PIXELS = 2**32 - 1


def _compressed_counts(counts: bytes) -> np.ndarray | str:
    """The run lengths of a compressed COCO counts string (pycocotools' ``rleFrString``, vectorised),
    or a reason why it is not one."""
    chars = np.frombuffer(counts, dtype=np.uint8).astype(np.int64) - 48
    if chars.size == 0:
        return np.zeros(0, dtype=np.int64)
    if chars.min() < 0 or chars.max() > 63:
        return "counts string has characters outside the COCO alphabet"
    more = (chars & 0x20) != 0
    if more[-1]:
        return "counts string ends in the middle of a number"
    ends = np.flatnonzero(~more)  # index of each number's last character
    starts = np.concatenate(([0], ends[:-1] + 1))
    lengths = ends - starts + 1
    if lengths.max() > 7:  # 35 bits: far beyond 2**32
        return "counts string holds a number too large for a run length"
    token = np.repeat(np.arange(len(ends)), lengths)
    shift = 5 * (np.arange(chars.size) - starts[token])
    # the 5-bit groups of a number occupy disjoint bits: their sum is the number (exact in float64 below 2**53)
    values = np.bincount(token, weights=(chars & 0x1F) << shift, minlength=len(ends)).astype(np.int64)
    negative = (chars[ends] & 0x10) != 0  # sign bit of the last 5-bit group
    values = np.where(negative, values - (np.int64(1) << (5 * lengths)), values)
    runs = values.copy()  # counts[i] = value[i] + counts[i - 2] for i > 2 (deltas)
    if len(runs) > 3:
        runs[3::2] = runs[1] + np.cumsum(values[3::2])
        runs[4::2] = runs[2] + np.cumsum(values[4::2])
    return runs


def rle_problem(rle) -> str | None:
    """Why `rle` is not a usable COCO RLE dict, or None when it is: ``size`` two integers in
    [0, MAX_SIDE] (h x w < 2**32), ``counts`` a compressed string (or bytes) or a list of
    non-negative integers whose run lengths add up to exactly h x w."""
    if not isinstance(rle, dict) or "size" not in rle or "counts" not in rle:
        return f"not a COCO RLE dict with 'size' and 'counts': {str(rle)[:80]}"
    size = rle["size"]
    if (
        not isinstance(size, (list, tuple))
        or len(size) != 2
        or not all(isinstance(v, (int, np.integer)) and not isinstance(v, bool) for v in size)
    ):
        return f"size {str(size)[:40]} is not [height, width]"
    h, w = int(size[0]), int(size[1])
    if not (0 <= h <= MAX_SIDE and 0 <= w <= MAX_SIDE) or h * w > _MAX_PIXELS:
        return f"size {h}x{w} is outside 0..{MAX_SIDE} pixels per side"
    counts = rle["counts"]
    if isinstance(counts, str):
        try:
            counts = counts.encode("ascii")
        except UnicodeEncodeError:
            return "counts string has characters outside the COCO alphabet"
    if isinstance(counts, bytes):
        runs = _compressed_counts(counts)
        if isinstance(runs, str):
            return runs
        bad = bool(runs.size) and (runs.min() < 0 or runs.max() > _MAX_PIXELS)
        total = int(runs.sum()) if not bad else None
    elif isinstance(counts, list):
        if not all(isinstance(v, (int, np.integer)) and not isinstance(v, bool) for v in counts):
            return "counts list holds a value that is not an integer"
        bad = any(v < 0 or v > _MAX_PIXELS for v in counts)
        total = sum(int(v) for v in counts) if not bad else None
    else:
        return f"counts is a {type(counts).__name__}, not a string or a list"
    if bad:
        return "counts hold a negative or impossibly large run length"
    if total != h * w:
        return f"run lengths add up to {total}, not {h}x{w} = {h * w}"
    return None


def check_rle(rle, where: str = "mask") -> dict:
    """`rle` unchanged when `rle_problem` finds nothing; else DataError "`where`: <problem>"."""
    problem = rle_problem(rle)
    if problem is not None:
        raise DataError(f"{where}: malformed RLE mask: {problem}")
    return rle


def mask_to_rle(mask: np.ndarray) -> dict:
    """Encode a binary mask ``[H, W]`` (bool or any number type; nonzero = foreground) as RLE."""
    mask = np.asarray(mask)
    if mask.ndim != 2:
        raise ValueError(f"mask_to_rle expects a 2-D mask [H, W], got shape {mask.shape}")
    rle = coco_mask.encode(np.asfortranarray(mask != 0, dtype=np.uint8))
    return {"size": [int(rle["size"][0]), int(rle["size"][1])], "counts": rle["counts"].decode("ascii")}


def _to_coco(rle: dict) -> dict:
    """JSON RLE -> the form pycocotools functions take (bytes counts; uncompressed lists compressed).
    Only the shape of the dict is checked here (this is on evaluation's hot path): RLEs read from files
    go through `check_rle` first."""
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
    """Decode an RLE dict to a ``np.uint8`` mask ``[h, w]`` with values {0, 1} (checked first: a malformed
    RLE raises DataError, a ValueError)."""
    check_rle(rle)
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
