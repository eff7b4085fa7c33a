"""SynthScars reader, validation, paths, spans, samples, collate and the epoch sampler."""

from __future__ import annotations

import json
import re
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from pycocotools import mask as mask_utils

from legion.data.synthscars import (
    MARKER,
    PREFIX,
    AnnotationFormatError,
    EpochSampler,
    PathEscapeError,
    Record,
    Ref,
    SkippedSample,
    SynthScarsDataset,
    build_answer,
    collate,
    find_annotation_file,
    load_annotations,
    rasterize_polygons,
    records_to_json,
    resolve_image_path,
    resolve_spans,
)
from legion.model.conversation import IGNORE_INDEX, IMAGE_TOKEN_INDEX, SEG

TAG_RE = re.compile(r"<p> (.*?) </p> \[SEG\]", re.S)


def independent_mask(segmentation, height, width) -> np.ndarray:
    rles = mask_utils.frPyObjects(segmentation, height, width)
    return (mask_utils.decode(rles).sum(axis=2) > 0).astype(np.uint8)


# --- the real sample ------------------------------------------------------------------------
def test_sample_loads_all_records_and_refs(synthscars_sample_path):
    records, report = load_annotations(synthscars_sample_path)
    assert len(records) == 119 and report.num_entries == 119
    assert sum(len(r.refs) for r in records) == 260
    assert report.errors == []
    # the only remarks: record 1547 has no refs (and its caption therefore ends at the marker)
    assert {(p.record_id, p.code) for p in report.warnings} == {("1547", "no_refs")}
    assert all(len(ref.polygons) == 1 for r in records for ref in r.refs)


def test_sample_spans_are_anchored_in_the_detail_section(synthscars_sample_path):
    records, _ = load_annotations(synthscars_sample_path)
    methods, first_occurrence_in_summary = Counter(), 0
    for record in records:
        spans, dropped = resolve_spans(record)
        assert dropped == []
        detail_start = record.caption.index(MARKER.rstrip())
        for span in spans:
            methods[span.method] += 1
            ref = record.refs[span.ref_index]
            assert span.start > detail_start
            assert record.caption[span.start : span.end] == ref.sentence
            assert record.caption[span.end : span.end + 1 + len(ref.explanation)] == ":" + ref.explanation
            first_occurrence_in_summary += record.caption.find(ref.sentence) < detail_start
        answer, kept = build_answer(record, spans)
        assert answer.count(SEG) == len(kept) == len(record.refs)
        assert TAG_RE.findall(answer) == [ref.sentence for ref in kept]
        assert TAG_RE.sub(lambda m: m.group(1), answer) == record.caption  # untagging gives the caption back
    assert methods == {"anchored": 260}
    assert first_occurrence_in_summary == 3  # where the reference's caption.find() tags the summary


def test_duplicate_and_nested_phrases_bind_to_their_own_entries(synthscars_sample_path):
    records = {r.id: r for r in load_annotations(synthscars_sample_path)[0]}
    for record_id in ("717", "2271"):
        record = records[record_id]
        answer, kept = build_answer(record)
        assert kept == record.refs  # caption order == list order here, duplicates kept once each
        details = answer.split(MARKER.strip(), 1)[1]
        expected = "".join(f"<p> {r.sentence} </p> [SEG]:{r.explanation}" for r in record.refs)
        assert details.strip() == expected


@pytest.fixture(scope="module")
def sample_dataset(synthscars_sample_root, data_tokenizer):
    return SynthScarsDataset(
        synthscars_sample_root, "train", data_tokenizer, clip_size=32, sam_input_size=64, sam_pad_to=64, max_length=None
    )


def test_sample_masks_equal_independent_pycocotools(sample_dataset, synthscars_sample_path):
    bodies = {k: v for entry in json.loads(Path(synthscars_sample_path).read_text()) for k, v in entry.items()}
    assert len(sample_dataset) == 118
    assert sample_dataset.report == Counter({"no_grounded_ref": 1})
    seg_id = sample_dataset.seg_id
    refs_seen = 0
    for index in range(len(sample_dataset)):
        sample = sample_dataset[index]
        body = bodies[sample["record_id"]]
        height, width = sample["original_size"]
        masks = sample["gt_masks"].numpy()
        assert masks.shape == (len(body["refs"]), height, width)
        assert int((sample["input_ids"] == seg_id).sum()) == len(masks)
        for mask, ref in zip(masks, body["refs"]):  # sample refs are in caption order == list order
            np.testing.assert_array_equal(mask, independent_mask(ref["segmentation"], height, width))
            assert set(np.unique(mask)) <= {0, 1} and mask.sum() > 0
        refs_seen += len(masks)
    assert refs_seen == 260


def test_sample_labels_supervise_exactly_the_answer(sample_dataset, data_tokenizer):
    sample = sample_dataset[0]
    ids, labels = sample["input_ids"], sample["labels"]
    assert (ids == IMAGE_TOKEN_INDEX).sum() == 1
    supervised = labels != IGNORE_INDEX
    first = int(supervised.nonzero()[0])
    assert supervised[first:].all() and not supervised[:first].any()
    assert torch.equal(labels[first:], ids[first:]) and int(ids[-1]) == data_tokenizer.eos_token_id
    text = data_tokenizer.decode(ids[first:-1].tolist())
    assert text.replace(" ", "").startswith(PREFIX.replace(" ", ""))


# --- validation -----------------------------------------------------------------------------
def _caption(*pairs, summary="A thing."):
    return PREFIX + summary + MARKER + "".join(f"{s}:{e}" for s, e in pairs)


def _write(tmp_path, data) -> Path:
    path = tmp_path / "ann.json"
    path.write_text(json.dumps(data))
    return path


SQUARE = [10.0, 10.0, 30.0, 10.0, 30.0, 30.0, 10.0, 30.0]


def test_validation_names_record_and_field(tmp_path):
    good_ref = {"sentence": "left ear", "explanation": "bent.", "bbox": None, "segmentation": [SQUARE]}
    data = [
        {
            "1": {
                "img_file_name": "a.png",
                "caption": _caption(("left ear", "bent."), ("eye", "")),
                "refs": [
                    good_ref,
                    {"sentence": "eye", "explanation": "", "segmentation": [SQUARE]},  # empty explanation
                    {"sentence": "nose", "explanation": "x", "segmentation": [[1.0, 2.0, 3.0]]},  # odd length
                    {"sentence": "lip", "explanation": "x", "segmentation": [[1.0, 2.0, 3.0, 4.0]]},  # 2 points
                    {"sentence": "chin", "explanation": "x", "segmentation": [[1.0, float("nan"), 3.0, 4.0, 5.0, 6.0]]},
                    {"explanation": "x", "segmentation": [SQUARE]},  # no sentence
                ],
            }
        },
        {"1": {"img_file_name": "b.png", "caption": _caption(), "refs": []}},  # duplicate id
        {"2": {"caption": _caption(), "refs": []}},  # no image name
        {"3": {"img_file_name": "c.png", "caption": _caption(("left ear", "bent.")), "refs": [good_ref]}},
        {"4": {"img_file_name": "c.png", "caption": _caption(("left ear", "bent.")), "refs": [good_ref]}},
        ["not", "an", "object"],
    ]
    path = tmp_path / "ann.json"
    path.write_text(json.dumps(data).replace("NaN", "NaN"))
    records, report = load_annotations(path)
    found = {(p.record_id, p.field, p.code, p.severity) for p in report.problems}
    assert ("1", "refs[1].explanation", "empty_explanation", "warning") in found
    assert ("1", "refs[2].segmentation[0]", "bad_polygon", "error") in found
    assert ("1", "refs[3].segmentation[0]", "bad_polygon", "error") in found
    assert ("1", "refs[4].segmentation[0]", "bad_polygon", "error") in found
    assert ("1", "refs[5].sentence", "missing_field", "error") in found
    assert ("1", "<id>", "duplicate_id", "error") in found
    assert ("2", "img_file_name", "missing_field", "error") in found
    assert ("4", "<record>", "duplicate_record", "warning") in found
    assert ("#5", "<entry>", "not_one_key_object", "error") in found
    # the three refs with no valid polygon (nose, lip, chin) are dropped, and say so
    dropped = [p for p in report.problems if p.message.endswith("ref dropped") and p.field.endswith(".segmentation")]
    assert len(dropped) == 3
    assert [r.id for r in records] == ["1", "3", "4"]
    assert [ref.sentence for ref in records[0].refs] == ["left ear", "eye"]
    assert all(str(p).startswith(p.severity) and p.field in str(p) for p in report.problems)


def test_sentence_not_in_caption_is_warned_counted_and_rest_kept(tmp_path):
    data = [
        {
            "7": {
                "img_file_name": "a.png",
                "caption": _caption(("left ear", "bent.")),
                "refs": [
                    {"sentence": "left ear", "explanation": "bent.", "segmentation": [SQUARE]},
                    {"sentence": "tail", "explanation": "long.", "segmentation": [SQUARE]},
                ],
            }
        }
    ]
    records, report = load_annotations(_write(tmp_path, data))
    assert [(p.record_id, p.field, p.code) for p in report.warnings] == [
        ("7", "refs[1].sentence", "sentence_not_in_caption")
    ]
    spans, dropped = resolve_spans(records[0])
    assert [s.ref_index for s in spans] == [0] and dropped == [(1, "not_in_caption")]


@pytest.mark.parametrize("text, where", [('[{"1": {]', "line 1"), ('{"a": 1}', "expected a JSON list")])
def test_unusable_file_raises_with_location(tmp_path, text, where):
    path = tmp_path / "bad.json"
    path.write_text(text)
    with pytest.raises(AnnotationFormatError, match=where):
        load_annotations(path)


# --- spans: fallbacks ---------------------------------------------------------------------------
def test_span_fallbacks_and_drops_are_counted():
    caption = _caption(("red wheel", "it is red."), ("sky", "too green."), summary="A red wheel under a sky.")
    refs = [
        Ref("red wheel", "WRONG explanation", [SQUARE]),  # anchor fails -> after cursor (detail)
        Ref("sky", "too green.", [SQUARE]),  # anchored
        Ref("under", "x", [SQUARE]),  # only in the summary -> anywhere
        Ref("sky", "again", [SQUARE]),  # the free occurrence is in the summary
        Ref("cloud", "x", [SQUARE]),
    ]  # nowhere -> dropped
    spans, dropped = resolve_spans(Record("9", "a.png", caption, refs))
    by_ref = {s.ref_index: s for s in spans}
    assert by_ref[0].method == "after_cursor" and by_ref[0].start > caption.index(MARKER)
    assert by_ref[1].method == "anchored"
    assert by_ref[2].method == "anywhere" and by_ref[2].start < caption.index(MARKER)
    assert by_ref[3].method == "anywhere" and caption[by_ref[3].start : by_ref[3].end] == "sky"
    assert dropped == [(4, "not_in_caption")]
    answer, kept = build_answer(Record("9", "a.png", caption, refs), spans)
    assert [r.sentence for r in kept] == ["under", "sky", "red wheel", "sky"]  # caption order
    assert TAG_RE.sub(lambda m: m.group(1), answer) == caption


# --- paths --------------------------------------------------------------------------------------
def test_path_resolution_rules(tmp_path):
    images = tmp_path / "train" / "images"
    assert resolve_image_path(tmp_path, "train", "x.png") == images / "x.png"
    assert resolve_image_path(tmp_path, "train", "sub/./x.png") == images / "sub" / "x.png"
    assert resolve_image_path(tmp_path, "train", "/mnt/cluster/richhf-18k/raw_imgs/u.png") == images / "u.png"
    assert resolve_image_path(tmp_path, "train", "C:\\data\\imgs\\w.jpg") == images / "w.jpg"
    assert resolve_image_path(tmp_path, "train", "/abs/y.png", allow_absolute=True) == Path("/abs/y.png")
    for bad in ("../x.png", "a/../../x.png", "../../../etc/passwd", "..", "", "a\x00b.png", "/mnt/.."):
        with pytest.raises(PathEscapeError):
            resolve_image_path(tmp_path, "train", bad)


@pytest.mark.parametrize("layout", ["train/annotations/train.json", "train/annoations/train.json"])
def test_find_annotation_file_spellings(tmp_path, layout):
    (tmp_path / layout).parent.mkdir(parents=True)
    (tmp_path / layout).write_text("[]")
    assert find_annotation_file(tmp_path, "train") == tmp_path / layout


def test_find_annotation_file_loader_layout_and_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="annoations"):
        find_annotation_file(tmp_path, "test")
    (tmp_path / "train" / "annotations").mkdir(parents=True)
    (tmp_path / "train" / "annotations" / "test.json").write_text("[]")
    assert find_annotation_file(tmp_path, "test") == tmp_path / "train" / "annotations" / "test.json"


# --- masks ----------------------------------------------------------------------------------------
def test_rasterize_union_is_or_and_clipped():
    a = [2.0, 2.0, 12.0, 2.0, 12.0, 12.0, 2.0, 12.0]
    b = [8.0, 8.0, 18.0, 8.0, 18.0, 18.0, 8.0, 18.0]
    mask = rasterize_polygons([a, b], 20, 20)
    assert mask.dtype == np.uint8 and set(np.unique(mask)) == {0, 1}
    np.testing.assert_array_equal(mask, independent_mask([a, b], 20, 20))
    overflow = [-7.5, -3.0, 30.2, 4.0, 25.0, 31.0]  # crosses three borders
    big = independent_mask([[v + 50 for v in overflow]], 120, 120)[50:70, 50:70]
    np.testing.assert_array_equal(rasterize_polygons([overflow], 20, 20), big)


# --- dataset behaviour on bad inputs -----------------------------------------------------------
def _tiny_root(tmp_path, records, images):
    (tmp_path / "train" / "annotations").mkdir(parents=True)
    (tmp_path / "train" / "images").mkdir(parents=True)
    (tmp_path / "train" / "annotations" / "train.json").write_text(json.dumps(records_to_json(records)))
    for name, writer in images.items():
        writer(tmp_path / "train" / "images" / name)
    return tmp_path


def _good_png(path):
    Image.fromarray(np.full((40, 40, 3), 120, np.uint8)).save(path)


def _truncated_png(path):
    _good_png(path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _record(rid, name, n_refs=1, long_explanation=""):
    pairs = [(f"spot {i}", f"odd {i}.{long_explanation}") for i in range(n_refs)]
    return Record(rid, name, _caption(*pairs), [Ref(s, e, [SQUARE]) for s, e in pairs])


def test_bad_samples_are_counted_not_fatal(tmp_path, data_tokenizer):
    records = [
        _record("1", "ok.png"),
        _record("2", "missing.png"),
        _record("3", "../escape.png"),
        _record("4", "trunc.png"),
        _record("5", "small.png"),
        Record("6", "ok.png", _caption(), []),
    ]
    root = _tiny_root(
        tmp_path,
        records,
        {"ok.png": _good_png, "trunc.png": _truncated_png, "small.png": lambda p: Image.new("RGB", (12, 12)).save(p)},
    )
    ds = SynthScarsDataset(root, "train", data_tokenizer, clip_size=16, sam_input_size=32, sam_pad_to=32)
    assert ds.report == Counter(
        {"image_missing": 1, "path_escape": 1, "polygon_outside_image": 1, "no_grounded_ref": 1}
    )
    assert {(p.record_id, p.field) for p in ds.problems} == {
        ("2", "img_file_name"),
        ("3", "img_file_name"),
        ("5", "refs[].segmentation"),
        ("6", "refs"),
    }
    loader = torch.utils.data.DataLoader(ds, batch_size=2, collate_fn=collate, shuffle=False)
    batches = list(loader)  # the truncated PNG passes the header check and fails at decode
    assert batches[0]["record_ids"] == ["1"] and batches[0]["skipped"] == [("4", "truncated")]


def test_truncation_that_would_cut_a_seg_is_skipped(tmp_path, data_tokenizer):
    records = [_record("1", "ok.png", n_refs=2, long_explanation=" word" * 60), _record("2", "ok.png")]
    root = _tiny_root(tmp_path, records, {"ok.png": _good_png})
    full = SynthScarsDataset(
        root, "train", data_tokenizer, clip_size=16, sam_input_size=32, sam_pad_to=32, max_length=None
    )
    long_len, short_len = len(full.items[0].input_ids), len(full.items[1].input_ids)
    seg_positions = (full.items[0].input_ids == full.seg_id).nonzero().flatten().tolist()
    cut = SynthScarsDataset(
        root, "train", data_tokenizer, clip_size=16, sam_input_size=32, sam_pad_to=32, max_length=seg_positions[-1]
    )
    assert cut.report["truncated_past_seg"] == 1 and [i.record.id for i in cut.items] == ["2"]
    assert short_len <= seg_positions[-1] < long_len
    tail = SynthScarsDataset(
        root, "train", data_tokenizer, clip_size=16, sam_input_size=32, sam_pad_to=32, max_length=long_len - 3
    )
    assert tail.report["truncated_text_only"] == 1 and len(tail.items[0].input_ids) == long_len - 3


# --- collate --------------------------------------------------------------------------------------
def _fake_sample(ids, hw=(5, 7), n_masks=1):
    ids = torch.tensor(ids)
    return {
        "input_ids": ids,
        "labels": ids.clone(),
        "clip_pixel_values": torch.zeros(3, 4, 4),
        "sam_pixel_values": torch.zeros(3, 8, 8),
        "sam_resized_size": (4, 6),
        "original_size": hw,
        "gt_masks": torch.ones(n_masks, *hw, dtype=torch.uint8),
        "image_path": "p",
        "record_id": "r",
    }


def test_collate_right_pads_and_masks_from_lengths():
    batch = collate(
        [_fake_sample([1, 5, 0, 9]), SkippedSample("x", "y", "corrupt"), _fake_sample([1, 0], hw=(3, 3), n_masks=2)]
    )
    assert batch["input_ids"].tolist() == [[1, 5, 0, 9], [1, 0, 0, 0]]
    assert batch["attention_mask"].tolist() == [[True] * 4, [True, True, False, False]]  # genuine id 0 kept
    assert batch["labels"].tolist() == [[1, 5, 0, 9], [1, 0, IGNORE_INDEX, IGNORE_INDEX]]
    assert batch["gt_masks"][1].dtype == torch.float32 and batch["gt_masks"][1].shape == (2, 3, 3)
    assert batch["original_sizes"] == [(5, 7), (3, 3)] and batch["skipped"] == [("x", "corrupt")]
    assert batch["clip_pixel_values"].shape == (2, 3, 4, 4) and batch["sam_pixel_values"].shape == (2, 3, 8, 8)
    assert collate([SkippedSample("x", "y", "corrupt")]) is None


# --- sampler --------------------------------------------------------------------------------------
def test_epoch_sampler_is_deterministic_and_complete():
    a, b = EpochSampler(50, seed=3), EpochSampler(50, seed=3)
    orders = []
    for epoch in range(3):
        a.set_epoch(epoch), b.set_epoch(epoch)
        assert list(a) == list(b) and sorted(a) == list(range(50))
        orders.append(list(a))
    assert orders[0] != orders[1] != orders[2]
    c = EpochSampler(50, seed=4)
    assert list(c) != orders[0]


@pytest.mark.parametrize("n, world", [(10, 3), (7, 4), (2, 4), (64, 8)])
def test_epoch_sampler_distributed_shares_partition(n, world):
    shares = []
    for rank in range(world):
        sampler = EpochSampler(n, seed=1, rank=rank, world_size=world)
        sampler.set_epoch(5)
        shares.append(list(sampler))
        assert len(sampler) == len(shares[-1])
    flat = [i for share in shares for i in share]
    assert sorted(flat) == list(range(n))  # nothing lost, nothing duplicated
    assert max(map(len, shares)) - min(map(len, shares)) <= 1


def test_epoch_sampler_resumes_mid_epoch():
    sampler = EpochSampler(30, seed=7, rank=1, world_size=2)
    sampler.set_epoch(2)
    full = list(sampler)
    state = sampler.state_dict(consumed=6)
    resumed = EpochSampler(30, seed=7, rank=1, world_size=2)
    resumed.load_state_dict(json.loads(json.dumps(state)))
    assert list(resumed) == full[6:] and len(resumed) == len(full) - 6
    resumed.set_epoch(3)
    assert len(list(resumed)) == len(full)
    with pytest.raises(ValueError):
        EpochSampler(31, seed=7, rank=1, world_size=2).load_state_dict(state)
