"""ToyScars: layout, exact caption template, masks vs pixels, determinism, CLI, speed."""

from __future__ import annotations

import json
import re
import time
from collections import Counter

import numpy as np
import pytest
from PIL import Image

from legion.data.synthscars import (
    MARKER,
    PREFIX,
    SynthScarsDataset,
    collate,
    find_annotation_file,
    load_annotations,
    rasterize_polygons,
    resolve_spans,
)
from legion.data.toy import (
    CATEGORIES,
    CONTENT_TYPES,
    LOCATIONS,
    MAX_AREA,
    MIN_AREA,
    caption_corpus,
    generator_trace,
    location_of,
    make_toy_data,
)


def _records(root, split):
    records, report = load_annotations(find_annotation_file(root, split))
    return records, report


def test_layout_and_annotations(toy_data_dir):
    for split, count in (("train", 12), ("test", 6)):
        records, report = _records(toy_data_dir, split)
        assert len(records) == count and report.errors == [] and report.warnings == []
        images = sorted(p.name for p in (toy_data_dir / split / "images").iterdir())
        assert images == sorted(r.img_file_name for r in records)
        for label in ("0_real", "1_fake"):
            folder = toy_data_dir / "detection" / split / "toyscars" / label
            assert sorted(p.name for p in folder.iterdir()) == images
    train_ids = {r.id for r in _records(toy_data_dir, "train")[0]}
    assert train_ids.isdisjoint(r.id for r in _records(toy_data_dir, "test")[0])
    meta = json.loads((toy_data_dir / "toyscars.json").read_text())
    assert meta["size"] == 64 and meta["splits"]["train"]["images"] == 12


def test_captions_follow_the_synthscars_template_exactly(toy_data_dir):
    wheres = [w for row in LOCATIONS for w in row]
    for record in _records(toy_data_dir, "train")[0] + _records(toy_data_dir, "test")[0]:
        assert record.content_type in CONTENT_TYPES and record.artifact_category in CATEGORIES
        assert record.caption.startswith(PREFIX) and record.caption.count(MARKER) == 1
        summary, details = record.caption[len(PREFIX) :].split(MARKER)
        assert "\n" not in summary and summary.endswith(".")
        assert details == "".join(f"{r.sentence}:{r.explanation}" for r in record.refs)
        assert 1 <= len(record.refs) <= 2 and len({r.sentence for r in record.refs}) == len(record.refs)
        for ref in record.refs:
            assert ref.artifact_category == record.artifact_category
            assert ":" not in ref.sentence
            where = next(w for w in wheres if ref.sentence.endswith(w))  # phrase says where it is
            assert where in ref.explanation
        spans, dropped = resolve_spans(record)
        assert dropped == [] and {s.method for s in spans} == {"anchored"}


def test_artifacts_live_exactly_inside_their_polygons(toy_data_dir):
    for record in _records(toy_data_dir, "train")[0]:
        fake = np.asarray(Image.open(toy_data_dir / "train" / "images" / record.img_file_name))
        real = np.asarray(
            Image.open(toy_data_dir / "detection" / "train" / "toyscars" / "0_real" / record.img_file_name)
        )
        assert fake.shape == real.shape == (64, 64, 3)
        union = np.zeros((64, 64), np.uint8)
        for ref in record.refs:
            mask = rasterize_polygons(ref.polygons, 64, 64)
            assert MIN_AREA <= mask.mean() <= MAX_AREA
            where = next(w for row in LOCATIONS for w in row if ref.sentence.endswith(w))
            assert location_of(mask) == where
            union |= mask
        outside = union == 0
        # outside the artifacts a fake is its clean render plus the global generator trace, nothing else
        traced = np.round(np.clip(real + generator_trace(64), 0, 255)).astype(np.uint8)
        np.testing.assert_allclose(fake[outside].astype(int), traced[outside].astype(int), atol=1)
        changed = np.abs(fake.astype(int) - traced.astype(int)).sum(axis=2) > 0
        assert changed[union > 0].mean() > 0.05  # the artifact is visible


def test_generation_is_deterministic_and_independent_of_workers(tmp_path):
    make_toy_data(tmp_path / "a", num_train=6, num_test=2, seed=5, size=48, workers=1)
    make_toy_data(tmp_path / "b", num_train=6, num_test=2, seed=5, size=48, workers=2)
    make_toy_data(tmp_path / "c", num_train=6, num_test=2, seed=6, size=48, workers=1)
    files = sorted(p.relative_to(tmp_path / "a") for p in (tmp_path / "a").rglob("*") if p.is_file())
    assert len(files) == 8 * 3 + 2 + 1
    for rel in files:
        assert (tmp_path / "a" / rel).read_bytes() == (tmp_path / "b" / rel).read_bytes(), rel
    a = (tmp_path / "a" / "train" / "annotations" / "train.json").read_text()
    assert a != (tmp_path / "c" / "train" / "annotations" / "train.json").read_text()


def test_variety_over_a_few_dozen_images(tmp_path):
    make_toy_data(tmp_path, num_train=40, num_test=0, seed=1, size=48)
    records = _records(tmp_path, "train")[0]
    assert Counter(r.content_type for r in records) == {c: 10 for c in CONTENT_TYPES}
    assert set(r.artifact_category for r in records) == set(CATEGORIES)
    assert len({r.refs[0].sentence for r in records}) > 20
    assert any(len(r.refs) == 2 for r in records)


def test_caption_corpus_covers_every_emitted_word(toy_data_dir):
    corpus_words = set(re.findall(r"[A-Za-z]+", " ".join(caption_corpus())))
    for split in ("train", "test"):
        for record in _records(toy_data_dir, split)[0]:
            assert set(re.findall(r"[A-Za-z]+", record.caption)) <= corpus_words
    assert len(corpus_words) < 150  # a small closed vocabulary


def test_toy_feeds_the_training_dataset(toy_data_dir, data_tokenizer):
    ds = SynthScarsDataset(toy_data_dir, "train", data_tokenizer, clip_size=32, sam_input_size=64, sam_pad_to=64)
    assert len(ds) == 12 and sum(ds.report.values()) == 0
    batch = collate([ds[0], ds[1]])
    assert batch["sam_pixel_values"].shape == (2, 3, 64, 64) and batch["original_sizes"] == [(64, 64)] * 2
    for masks, ids in zip(batch["gt_masks"], batch["input_ids"]):
        assert masks.shape[0] == int((ids == ds.seg_id).sum()) and (masks.flatten(1).sum(1) > 0).all()


def test_detection_split_reads_with_the_detection_lister(toy_data_dir):
    detection = pytest.importorskip("legion.data.detection")
    items = detection.list_detection_images(toy_data_dir / "detection" / "train")
    assert Counter((it.subset, it.is_fake) for it in items) == {("toyscars", False): 12, ("toyscars", True): 12}


def test_cli_writes_the_layout(tmp_path, capsys):
    from legion.cli import main

    assert (
        main(
            [
                "make-toy-data",
                "--output-dir",
                str(tmp_path / "t"),
                "--num-train",
                "3",
                "--num-test",
                "1",
                "--size",
                "48",
                "--workers",
                "1",
            ]
        )
        == 0
    )
    assert "wrote ToyScars (4 images, 48 px)" in capsys.readouterr().out
    assert (tmp_path / "t" / "test" / "annotations" / "test.json").is_file()
    assert main(["make-toy-data", "--output-dir", str(tmp_path / "u"), "--size", "16"]) == 2
    assert "too small" in capsys.readouterr().err


@pytest.mark.slow
def test_thousand_images_in_under_two_minutes_on_two_workers(tmp_path):
    start = time.perf_counter()
    make_toy_data(tmp_path, num_train=900, num_test=100, seed=0, size=128, workers=2)
    elapsed = time.perf_counter() - start
    assert len(list((tmp_path / "train" / "images").iterdir())) == 900
    assert elapsed < 120, f"1000 ToyScars images took {elapsed:.1f} s"


def test_toy_passes_the_data_check(toy_data_dir):
    from legion.data.check import check_split

    for split, count in (("train", 12), ("test", 6)):
        summary = check_split(toy_data_dir, split, workers=1)
        assert summary["usable"] and summary["usable_records"] == count and summary["unusable_records"] == {}
        assert MIN_AREA <= summary["masks"]["ref_area_fraction"]["min"]
        assert summary["masks"]["ref_area_fraction"]["max"] <= MAX_AREA
