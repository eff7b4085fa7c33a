"""Detection data adapters (legion.data.detection) on generated folders and JSON lists.

Also hosts small generators shared by the other tests/test_detector*.py files.
"""

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from legion.data.detection import (
    DetectionDataError,
    DetectionItem,
    is_fake_to_reference_index,
    list_detection_images,
    reference_label_to_is_fake,
    summarize,
)

# --- generators (used by the other detector tests too) -------------------------------------------


def toy_image(rng: np.random.Generator, fake: bool, size: int = 48) -> np.ndarray:
    """A smooth two-colour gradient. Fake images are washed out (low contrast, bright) and carry a
    checker patch: a random tiny CLIP's CLS token sees global colour well but fine texture hardly at all,
    so the wash-out is what makes this fixture learnable for the training tests."""
    y, x = np.mgrid[0:size, 0:size] / size
    c0, c1 = rng.uniform(40, 215, 3), rng.uniform(40, 215, 3)
    t = (x * rng.uniform(0.2, 1) + y * rng.uniform(0.2, 1))[..., None] / 2
    img = c0 * (1 - t) + c1 * t
    if fake:
        img = img * 0.3 + 170
        p = size // 2
        top, left = rng.integers(0, size - p, 2)
        checker = ((np.indices((p, p)).sum(0) % 2) * 2 - 1)[..., None] * 90
        img[top : top + p, left : left + p] += checker
    return np.clip(img, 0, 255).astype(np.uint8)


def write_images(folder: Path, n: int, fake: bool, seed: int, size: int = 48) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    paths = []
    for i in range(n):
        p = folder / f"img_{i:03d}.png"
        Image.fromarray(toy_image(rng, fake, size)).save(p)
        paths.append(p)
    return paths


def make_detection_tree(
    root: Path, layout: dict[str, list[str] | None], n: int = 3, seed: int = 0, size: int = 48
) -> Path:
    """layout: {subset: None (single-class) | [class, ...] (multi-class)} -> UFD folder tree."""
    for s, (subset, classes) in enumerate(layout.items()):
        bases = [root / subset] if classes is None else [root / subset / c for c in classes]
        for b, base in enumerate(bases):
            write_images(base / "0_real", n, False, seed + 100 * s + 10 * b)
            write_images(base / "1_fake", n, True, seed + 100 * s + 10 * b + 1)
    return root


# --- folders --------------------------------------------------------------------------------------


def test_folder_single_and_multi_class_subsets(tmp_path):
    root = make_detection_tree(tmp_path / "test", {"biggan": None, "progan": ["airplane", "cat"]}, n=2)
    items = list_detection_images(root)
    counts = summarize(items)
    assert counts == {"biggan": {"real": 2, "fake": 2}, "progan": {"real": 4, "fake": 4}}
    # the folder name decides the label: 0_real -> real, 1_fake -> fake
    for it in items:
        assert ("1_fake" in Path(it.path).parts) == it.is_fake
        assert Path(it.path).is_file()
    # deterministic order
    assert items == list_detection_images(root)


def test_folder_root_is_one_subset(tmp_path):
    root = make_detection_tree(tmp_path, {"toyscars": None}, n=2) / "toyscars"
    items = list_detection_images(root)
    assert {it.subset for it in items} == {"toyscars"}
    assert sum(it.is_fake for it in items) == 2 and len(items) == 4


def test_folder_subset_filter_and_errors(tmp_path):
    root = make_detection_tree(tmp_path / "t", {"a": None, "b": None}, n=1)
    assert {it.subset for it in list_detection_images(root, subsets=["b"])} == {"b"}
    with pytest.raises(DetectionDataError, match="not found"):
        list_detection_images(root, subsets=["a", "zzz"])
    (tmp_path / "empty" / "x").mkdir(parents=True)
    with pytest.raises(DetectionDataError, match="0_real"):
        list_detection_images(tmp_path / "empty")
    with pytest.raises(DetectionDataError):
        list_detection_images(tmp_path / "nope")


def test_folder_ignores_non_images(tmp_path):
    root = make_detection_tree(tmp_path / "t", {"a": None}, n=1)
    (root / "a" / "0_real" / "notes.txt").write_text("x")
    (root / "a" / "0_real" / ".hidden.png").write_bytes(b"")
    assert len(list_detection_images(root)) == 2


# --- JSON lists (reference format: label "real" = real = reference index 1) ------------------------


def test_reference_label_mapping():
    assert reference_label_to_is_fake("real") is False
    assert reference_label_to_is_fake("fake") is True
    assert reference_label_to_is_fake("progan") is True  # anything but "real" is fake, as in the reference
    with pytest.raises(DetectionDataError, match="ambiguous"):
        reference_label_to_is_fake(1)
    assert is_fake_to_reference_index(True) == 0 and is_fake_to_reference_index(False) == 1


def test_json_train_list(tmp_path):
    root = make_detection_tree(tmp_path / "data", {"progan": ["cat"]}, n=2)
    rows = [
        {"image_path": "progan/cat/0_real/img_000.png", "label": "real"},
        {"image_path": "progan/cat/1_fake/img_000.png", "label": "fake"},
    ]
    lst = tmp_path / "progan_cls_train.json"
    lst.write_text(json.dumps(rows))
    items = list_detection_images(lst, data_base=root)
    assert [it.is_fake for it in items] == [False, True]
    assert items[0] == DetectionItem(str((root / rows[0]["image_path"]).resolve()), False, "progan_cls_train")


def test_json_test_list_with_categories_and_jsonl(tmp_path):
    root = make_detection_tree(tmp_path / "data", {"biggan": None, "guided": None}, n=1)
    rows = [
        {"image": "biggan/0_real/img_000.png", "label": "real", "category": "biggan"},
        {"image": "biggan/1_fake/img_000.png", "label": "biggan", "category": "biggan"},
        {"image": "guided/1_fake/img_000.png", "label": "fake", "category": "guided"},
    ]
    lst = root / "meta.jsonl"  # default data_base: the list's own folder
    lst.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    items = list_detection_images(lst)
    assert [(it.subset, it.is_fake) for it in items] == [("biggan", False), ("biggan", True), ("guided", True)]
    assert [it.subset for it in list_detection_images(lst, subsets=["guided"])] == ["guided"]


def test_json_refuses_escaping_and_bad_rows(tmp_path):
    (tmp_path / "base").mkdir()
    lst = tmp_path / "l.json"
    lst.write_text(json.dumps([{"image": "../secret.png", "label": "real"}]))
    with pytest.raises(DetectionDataError, match="escapes"):
        list_detection_images(lst, data_base=tmp_path / "base")
    lst.write_text(json.dumps([{"image": "/etc/passwd", "label": "real"}]))
    with pytest.raises(DetectionDataError, match="absolute"):
        list_detection_images(lst, data_base=tmp_path / "base")
    assert list_detection_images(lst, data_base=tmp_path / "base", allow_absolute=True)[0].path == "/etc/passwd"
    lst.write_text(json.dumps([{"image": "a.png"}]))
    with pytest.raises(DetectionDataError, match="label"):
        list_detection_images(lst)
    lst.write_text(json.dumps([{"label": "real"}]))
    with pytest.raises(DetectionDataError, match="image_path"):
        list_detection_images(lst)
    lst.write_text(json.dumps({"not": "a list"}))
    with pytest.raises(DetectionDataError, match="list"):
        list_detection_images(lst)
    with pytest.raises(DetectionDataError, match="data_base"):
        list_detection_images(tmp_path / "base", data_base=tmp_path)
