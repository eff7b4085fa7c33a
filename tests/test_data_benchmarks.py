"""LOKI and RichHF-18K ground-truth adapters on small generated fixtures."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from legion.data.benchmarks import (
    BenchmarkFormatError,
    find_loki_items,
    list_richhf_items,
    load_loki,
    loki_box_mask,
    loki_gt_mask,
    richhf_heatmap_path,
    richhf_mask,
)


def _inclusive(height, width, boxes, skip_degenerate=False):
    """Independent reference: explicit loops over pixels (no cv2)."""
    mask = np.zeros((height, width), np.uint8)
    for x, y, w, h in boxes:
        x1, y1 = max(int(x), 0), max(int(y), 0)
        x2, y2 = min(int(x + w), width - 1), min(int(y + h), height - 1)
        if skip_degenerate and (x2 <= x1 or y2 <= y1):
            continue
        for row in range(height):
            for col in range(width):
                if min(y1, y2) <= row <= max(y1, y2) and min(x1, x2) <= col <= max(x1, x2):
                    mask[row, col] = 1
    return mask


LOKI_ITEMS = [
    {
        "image_path": "loki/images/a.png",
        "problems": {
            "regional": [
                {"region": [2.7, 3.9, 5.5, 4.2], "desc": "odd hand"},
                {"region": [15.2, -2.0, 10.0, 6.0]},
            ],  # crosses the top and right borders
            "global": [{"desc": "The hand has six fingers."}],
        },
    },
    {"image_path": "/abs/other/b.png", "problems": {"regional": [{"region": [1, 1, 0.5, 3]}], "global": []}},
    {"image_path": "loki/images/a.png", "problems": {"regional": [{"region": [0, 15, 3, 3]}]}},  # duplicate name
    {"image_path": "loki/images/c.png", "problems": {}},
]


@pytest.fixture()
def loki_file(tmp_path):
    path = tmp_path / "loki.json"
    path.write_text(json.dumps(LOKI_ITEMS), encoding="utf-16")
    return path


def test_loki_reads_utf16_and_fields(loki_file):
    items = load_loki(loki_file)
    assert [it.file_name for it in items] == ["a.png", "b.png", "a.png", "c.png"]
    assert items[0].regions == [[2.7, 3.9, 5.5, 4.2], [15.2, -2.0, 10.0, 6.0]]
    assert items[0].global_desc == "The hand has six fingers." and items[0].region_descs == ["odd hand", None]
    assert items[1].global_desc is None and items[3].regions == []


def test_loki_masks_are_inclusive_truncated_clipped_unions(loki_file):
    items = load_loki(loki_file)
    height, width = 18, 20
    mask = loki_gt_mask(items, "a.png", height, width)
    boxes = items[0].regions + items[2].regions
    np.testing.assert_array_equal(mask, _inclusive(height, width, boxes))
    # worked example: [2.7, 3.9, 5.5, 4.2] -> x 2..8, y 3..8 inclusive
    single = loki_box_mask([[2.7, 3.9, 5.5, 4.2]], height, width)
    assert single.sum() == 7 * 6 and single[3, 2] == 1 and single[8, 8] == 1 and single[9, 8] == 0
    assert mask[0, 19] == 1 and mask[17, 0] == 1  # clipped to W-1 / H-1, never wrapped
    assert set(np.unique(mask)) == {0, 1}


def test_loki_degenerate_box_conventions(loki_file):
    items = load_loki(loki_file)
    box = items[1].regions  # [1, 1, 0.5, 3] -> x1 == x2 == 1
    assert loki_box_mask(box, 6, 6).sum() == 4  # reference: a 1-px wide column, inclusive
    assert loki_box_mask(box, 6, 6, skip_degenerate=True).sum() == 0  # ArtiAgent skips it
    np.testing.assert_array_equal(loki_box_mask(box, 6, 6), _inclusive(6, 6, box))


def test_loki_matching_is_exact(loki_file):
    items = load_loki(loki_file)
    assert len(find_loki_items(items, "a.png")) == 2 and find_loki_items(items, "aa.png") == []
    assert find_loki_items(items, "some/dir/b.png")[0].index == 1
    with pytest.raises(KeyError):
        loki_gt_mask(items, "x.png", 4, 4)


def test_loki_errors_name_item_and_field(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text(
        json.dumps([{"image_path": "z.png", "problems": {"regional": [{"region": [1, 2, 3]}]}}]), encoding="utf-16"
    )
    with pytest.raises(BenchmarkFormatError, match=r"item 0 \(z.png\): problems.regional\[0\].region"):
        load_loki(bad)
    utf8 = tmp_path / "utf8.json"
    utf8.write_text(json.dumps(LOKI_ITEMS), encoding="utf-8")
    with pytest.raises(BenchmarkFormatError, match="UTF-16"):
        load_loki(utf8)


@pytest.fixture()
def richhf_root(tmp_path):
    raw, heat = tmp_path / "richhf-18k" / "test" / "raw_imgs", tmp_path / "richhf-18k" / "test" / "heatmaps"
    raw.mkdir(parents=True), heat.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for name in ("u1.png", "u2.png", "u3.png"):
        Image.fromarray(rng.integers(0, 256, (10, 12, 3), dtype=np.uint8)).save(raw / name)
    heatmap = np.zeros((10, 12), np.uint8)
    heatmap[2:5, 3:9] = 1  # faint but > 0
    heatmap[6:8, 0:4] = 200
    Image.fromarray(heatmap, "L").save(heat / "u1.png")
    Image.fromarray(np.zeros((9, 12), np.uint8), "L").save(heat / "u2.png")  # wrong size
    return raw


def test_richhf_heatmap_path_replaces_the_folder(tmp_path):
    assert str(richhf_heatmap_path("/d/richhf-18k/test/raw_imgs/x.png")) == "/d/richhf-18k/test/heatmaps/x.png"
    assert str(richhf_heatmap_path("/d/raw_imgs/t/raw_imgs/raw_imgs.png")) == "/d/raw_imgs/t/heatmaps/raw_imgs.png"
    with pytest.raises(BenchmarkFormatError, match="raw_imgs"):
        richhf_heatmap_path("/d/images/x.png")


def test_richhf_masks_thresholds_and_sizes(richhf_root):
    items, missing = list_richhf_items(richhf_root)
    assert [it.image_path.name for it in items] == ["u1.png", "u2.png"] and [m.name for m in missing] == ["u3.png"]
    heat = np.asarray(Image.open(items[0].heatmap_path), dtype=np.float32) / 255
    mask = richhf_mask(items[0].heatmap_path, expected_size=(10, 12))
    np.testing.assert_array_equal(mask, (heat > 0).astype(np.uint8))
    assert mask.sum() == 3 * 6 + 2 * 4
    strict = richhf_mask(items[0].heatmap_path, threshold=0.5)
    assert strict.sum() == 2 * 4
    resized = richhf_mask(items[0].heatmap_path, resize_to=16)
    assert resized.shape == (16, 16) and set(np.unique(resized)) <= {0, 1}
    with pytest.raises(BenchmarkFormatError, match="12x9"):
        richhf_mask(items[1].heatmap_path, expected_size=(10, 12))
