"""COCO RLE helpers shared by inference and evaluation."""

import json

import numpy as np
import pytest
from pycocotools import mask as coco_mask

from legion.utils.rle import (
    mask_to_rle,
    rle_area,
    rle_intersection_area,
    rle_size,
    rle_to_mask,
    rle_union,
)


@pytest.mark.parametrize("shape", [(1, 1), (7, 5), (64, 48), (3, 200)])
def test_round_trip_random_masks(shape):
    rng = np.random.default_rng(sum(shape))
    m = (rng.random(shape) < 0.3).astype(np.uint8)
    r = mask_to_rle(m)
    assert r["size"] == list(shape) and isinstance(r["counts"], str)
    json.loads(json.dumps(r))
    back = rle_to_mask(r)
    assert back.dtype == np.uint8 and back.shape == shape
    np.testing.assert_array_equal(back, m)
    assert rle_area(r) == int(m.sum())


def test_bool_and_nonbinary_inputs_are_foreground_when_nonzero():
    m = np.array([[0, 2, 255], [0, 0, 1]])
    np.testing.assert_array_equal(rle_to_mask(mask_to_rle(m)), (m != 0).astype(np.uint8))
    np.testing.assert_array_equal(rle_to_mask(mask_to_rle(m.astype(bool))), (m != 0).astype(np.uint8))


def test_empty_full_and_zero_size():
    assert rle_area(mask_to_rle(np.zeros((10, 10)))) == 0
    assert rle_area(mask_to_rle(np.ones((10, 10)))) == 100
    assert rle_to_mask(mask_to_rle(np.zeros((0, 4)))).shape == (0, 4)


def test_set_operations_on_run_lengths():
    rng = np.random.default_rng(1)
    a, b = (rng.random((30, 20)) < 0.4), (rng.random((30, 20)) < 0.4)
    ra, rb = mask_to_rle(a), mask_to_rle(b)
    assert rle_intersection_area(ra, rb) == int((a & b).sum())
    np.testing.assert_array_equal(rle_to_mask(rle_union([ra, rb])), (a | b).astype(np.uint8))
    assert rle_area(rle_union([], size=(3, 4))) == 0 and rle_size(rle_union([], size=(3, 4))) == (3, 4)
    with pytest.raises(ValueError, match="size"):
        rle_intersection_area(ra, mask_to_rle(np.zeros((5, 5))))


def test_reads_bytes_and_uncompressed_counts():
    m = np.zeros((6, 4), np.uint8)
    m[1:4, 1:3] = 1
    enc = coco_mask.encode(np.asfortranarray(m))  # bytes counts, as pycocotools returns them
    np.testing.assert_array_equal(rle_to_mask(enc), m)
    # uncompressed (list) counts, column-major runs starting with background
    flat = m.flatten(order="F")
    runs, cur, n = [], 0, 0
    for v in flat:
        if v != cur:
            runs.append(n)
            cur, n = v, 0
        n += 1
    runs.append(n)
    np.testing.assert_array_equal(rle_to_mask({"size": [6, 4], "counts": runs}), m)


def test_rejects_non_rle_and_3d():
    with pytest.raises(ValueError):
        rle_to_mask({"counts": "abc"})
    with pytest.raises(ValueError, match="2-D"):
        mask_to_rle(np.zeros((2, 2, 2)))
