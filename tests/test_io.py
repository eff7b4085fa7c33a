"""legion/utils/io.py: atomic writes leave the old file or the new one, never a torn one or a stray
temporary file; JSON Lines read with line-numbered errors and appended durably."""

import json
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import legion.utils.io as lio
from legion.utils.io import (
    append_jsonl,
    atomic_path,
    atomic_write_bytes,
    atomic_write_json,
    atomic_write_jsonl,
    atomic_write_png,
    atomic_write_text,
    read_jsonl,
    temp_path_for,
)


def _leftovers(folder: Path) -> list[str]:
    """Anything a helper may have left besides the targets (temporary files and folders)."""
    return sorted(p.name for p in folder.rglob("*") if ".tmp-" in p.name)


# --------------------------------------------------------------------------- atomic writes


def test_each_helper_replaces_the_target_whole_and_creates_parents(tmp_path):
    target = tmp_path / "a" / "b" / "out.json"
    atomic_write_bytes(target, b"old old old old")
    assert target.read_bytes() == b"old old old old"
    atomic_write_bytes(target, b"new")
    assert target.read_bytes() == b"new"  # replaced whole, not overwritten in place
    atomic_write_text(target, "é\n")
    assert target.read_bytes() == "é\n".encode()  # UTF-8, no newline translation
    atomic_write_json(target, {"b": "é", "a": [1]})
    assert target.read_text(encoding="utf-8") == json.dumps({"b": "é", "a": [1]}, indent=2) + "\n"
    atomic_write_json(target, {"b": "é"}, indent=None, ensure_ascii=False, sort_keys=True)
    assert target.read_bytes() == '{"b": "é"}\n'.encode()
    atomic_write_jsonl(target, [{"x": 1}, {"y": "é"}], ensure_ascii=False)
    assert target.read_bytes() == '{"x": 1}\n{"y": "é"}\n'.encode()
    with atomic_path(tmp_path / "new" / "img.png") as tmp:
        Image.fromarray(np.full((4, 5), 200, np.uint8)).save(tmp)  # PIL picks PNG from the suffix
    assert Image.open(tmp_path / "new" / "img.png").format == "PNG"
    assert _leftovers(tmp_path) == []


def test_temporary_names_live_next_to_the_target(tmp_path, monkeypatch):
    target = tmp_path / "sub" / "metrics.json"
    name = temp_path_for(target)
    assert name.parent == target.parent and name.name.startswith(".metrics.json.tmp-")
    assert temp_path_for(target) != name  # unique per call
    seen = []
    real_replace = os.replace

    def spy(src, dst):
        seen.append((Path(src), Path(dst)))
        real_replace(src, dst)

    monkeypatch.setattr(lio.os, "replace", spy)
    atomic_write_text(target, "x")
    with atomic_path(tmp_path / "w.safetensors") as tmp:
        # a private folder next to the target holding a file with the target's own name
        assert tmp.name == "w.safetensors" and tmp.parent.parent == tmp_path and tmp.parent.name.startswith(".")
        tmp.write_bytes(b"w")
    (src1, dst1), (src2, dst2) = seen
    assert src1.parent == target.parent and dst1 == target
    assert src2.parent.parent == tmp_path and dst2 == tmp_path / "w.safetensors"
    assert _leftovers(tmp_path) == []


def test_atomic_path_keeps_the_name_writers_embed(tmp_path):
    import zipfile

    import torch

    (tmp_path / "direct").mkdir()
    torch.save({"a": torch.ones(2)}, tmp_path / "direct" / "sam.pth")
    with atomic_path(tmp_path / "sam.pth") as tmp:
        torch.save({"a": torch.ones(2)}, tmp)
    # torch.save names its zip archive after the file: the same bytes as a direct save
    assert zipfile.ZipFile(tmp_path / "sam.pth").namelist()[0].startswith("sam/")
    assert (tmp_path / "sam.pth").read_bytes() == (tmp_path / "direct" / "sam.pth").read_bytes()


def test_atomic_write_png_writes_what_pil_writes(tmp_path):
    """The PNG writers of infer, the controller's cases and the report gallery: the same bytes as PIL saving
    to a .png file (their former way), the same pixels read back, the mode given or implied."""
    from legion.controller.cases import save_png

    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 256, (37, 53, 3), dtype=np.uint8)
    mask = (rng.random((37, 53)) < 0.3).astype(np.uint8)
    for name, array, mode in [("rgb", rgb, None), ("rgb_mode", rgb, "RGB"), ("grey", mask * 255, "L")]:
        Image.fromarray(array).save(tmp_path / f"{name}_pil.png")
        atomic_write_png(tmp_path / "new" / f"{name}.png", array, mode)
        assert (tmp_path / "new" / f"{name}.png").read_bytes() == (tmp_path / f"{name}_pil.png").read_bytes()
        with Image.open(tmp_path / "new" / f"{name}.png") as im:
            assert im.mode == ("RGB" if array.ndim == 3 else "L")
            np.testing.assert_array_equal(np.asarray(im), array)
    save_png(mask.astype(bool), tmp_path / "case_mask.png")  # a case's {0,1} mask -> 0/255 grey
    assert (tmp_path / "case_mask.png").read_bytes() == (tmp_path / "grey_pil.png").read_bytes()
    assert _leftovers(tmp_path) == []


class Boom(Exception):
    """Not an OSError: writers fail in their own ways too."""


@pytest.mark.parametrize("failure", ["fsync", "replace"])
def test_a_failing_write_keeps_the_old_file_and_leaves_nothing(tmp_path, monkeypatch, failure):
    target = tmp_path / "out.json"
    atomic_write_text(target, "previous\n")

    def fail(*args, **kwargs):
        raise Boom(failure)

    monkeypatch.setattr(lio.os, failure, fail)
    calls = [
        lambda: atomic_write_bytes(target, b"new bytes"),
        lambda: atomic_write_text(target, "new text"),
        lambda: atomic_write_json(target, {"new": 1}),
        lambda: atomic_write_jsonl(target, [{"new": 1}]),
    ]
    for call in calls:
        with pytest.raises(Boom):
            call()
        assert target.read_text() == "previous\n"
        assert sorted(p.name for p in tmp_path.iterdir()) == ["out.json"]


def test_atomic_path_cleans_up_when_the_writer_raises_halfway(tmp_path):
    target = tmp_path / "head.safetensors"
    target.write_bytes(b"previous")
    with pytest.raises(Boom):
        with atomic_path(target) as tmp:
            tmp.write_bytes(b"half a tensor")  # written, then the writer dies
            raise Boom("halfway")
    with pytest.raises(KeyboardInterrupt):
        with atomic_path(target) as tmp:
            tmp.write_bytes(b"half")
            raise KeyboardInterrupt
    with pytest.raises(FileNotFoundError):  # a writer that wrote nothing is an error, not an empty file
        with atomic_path(target):
            pass
    assert target.read_bytes() == b"previous"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["head.safetensors"]


def test_unserialisable_json_touches_nothing(tmp_path):
    target = tmp_path / "m.json"
    atomic_write_json(target, {"ok": 1})
    with pytest.raises(TypeError):
        atomic_write_json(target, {"bad": object()})
    with pytest.raises(TypeError):
        atomic_write_jsonl(target, [{"ok": 1}, {"bad": object()}])
    assert json.loads(target.read_text()) == {"ok": 1} and sorted(p.name for p in tmp_path.iterdir()) == ["m.json"]


# --------------------------------------------------------------------------- JSON Lines


def test_read_jsonl_skips_blank_lines_and_names_bad_lines(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_bytes(b'{"image": "a"}\n\n  \n{"image": "\xc3\xa9", "x": [1]}\r\n')
    assert read_jsonl(path, require=("image",)) == [{"image": "a"}, {"image": "é", "x": [1]}]
    cases = {
        b'{"image": "a"}\n{"image": \n': r"p\.jsonl:2: not JSON",
        b'{"image": "a"}\n\n[1, 2]\n': r"p\.jsonl:3: not a JSON object",
        b'{"image": "a"}\n{"x": 1}\n': r"p\.jsonl:2: record lacks field\(s\) 'image'",
        b'{"image": "\xc3"}\n': r"p\.jsonl:1: not UTF-8",
    }
    for data, message in cases.items():
        path.write_bytes(data)
        with pytest.raises(ValueError, match=message):
            read_jsonl(path, require=("image",))
    with pytest.raises(FileNotFoundError):
        read_jsonl(tmp_path / "missing.jsonl")


def test_only_newlines_split_records(tmp_path):
    # json.dumps(ensure_ascii=False) keeps U+2028 / U+0085 raw; str.splitlines() would cut the record there
    record = {"image": "a", "explanation": "line\u2028separator\x85next"}
    path = tmp_path / "p.jsonl"
    atomic_write_jsonl(path, [record, record], ensure_ascii=False)
    assert read_jsonl(path) == [record, record]


def test_a_torn_last_line_raises_by_default_and_is_skipped_with_a_warning_on_request(tmp_path):
    path = tmp_path / "part.jsonl"
    path.write_text('{"image": "a"}\n{"image": "b"}\n{"image": "c", "expl')  # a crash mid-append
    with pytest.raises(ValueError, match=r"part\.jsonl:3: not JSON"):
        read_jsonl(path)
    with pytest.warns(UserWarning, match=r"part\.jsonl: skipped 1 unreadable line\(s\) \(line 3\)"):
        assert [r["image"] for r in read_jsonl(path, skip_invalid=True)] == ["a", "b"]


def test_append_jsonl_round_trip_and_torn_line_repair(tmp_path):
    path = tmp_path / "new" / "part.jsonl"
    records = [{"image": "a", "text": "é ü"}, {"image": "b", "masks": [{"size": [1, 2], "counts": "0"}]}]
    for record in records:
        append_jsonl(path, record)
    # byte-identical to what legion infer has always appended: ensure_ascii=False, UTF-8, "\n"
    assert path.read_bytes() == b"".join((json.dumps(r, ensure_ascii=False) + "\n").encode() for r in records)
    assert read_jsonl(path) == records

    with open(path, "ab") as fh:
        fh.write(b'{"image": "c", "te')  # the process died here
    append_jsonl(path, {"image": "d"})  # a resumed run appends after a newline: the fragment stays alone
    assert path.read_bytes().endswith(b'{"image": "c", "te\n{"image": "d"}\n')
    append_jsonl(path, {"image": "e"})
    with pytest.warns(UserWarning, match=r"line 3\)"):
        assert [r["image"] for r in read_jsonl(path, skip_invalid=True)] == ["a", "b", "d", "e"]


def test_infer_resume_reader_keeps_its_tolerance(tmp_path):
    from legion.infer import read_records

    path = tmp_path / "predictions.part000-of-001.jsonl"
    assert read_records(path) == []  # not written yet
    path.write_text('{"image": "a"}\n{"no_image": 1}\n[3]\n{"image": "b"}\n{"image": "c", "x"')
    with pytest.warns(UserWarning, match="skipped 3"):
        assert [r["image"] for r in read_records(path)] == ["a", "b"]


# --------------------------------------------------------------------------- a real command


def _eval_inputs(tmp_path):
    from legion.utils.rle import mask_to_rle

    root = tmp_path / "SynthScars"
    (root / "test" / "annotations").mkdir(parents=True)
    (root / "test" / "images").mkdir(parents=True)
    Image.fromarray(np.zeros((20, 30, 3), np.uint8)).save(root / "test" / "images" / "a.png")
    caption = "Upon examining the image. I have found: Image a.\nTo elaborate, I have found the following artifacts. "
    ref = {"sentence": "part", "explanation": "bent.", "bbox": None, "segmentation": [[0, 0, 10, 0, 10, 10, 0, 10]]}
    (root / "test" / "annotations" / "test.json").write_text(
        json.dumps([{"0": {"img_file_name": "a.png", "caption": caption + "part:bent.", "refs": [ref]}}])
    )
    mask = np.zeros((20, 30), np.uint8)
    mask[0:5, 0:10] = 1
    pred = {"image": "a.png", "width": 30, "height": 20, "verdict": "fake", "fake_prob": None, "explanation": "x"}
    pred.update(phrases=["part"], masks=[mask_to_rle(mask)], union_mask=mask_to_rle(mask), no_seg=False, error=None)
    pred_path = tmp_path / "predictions.jsonl"
    pred_path.write_text(json.dumps(pred) + "\n")
    return root, pred_path


@pytest.mark.parametrize("failure", ["disk full at the rename", "writer dies mid-write"])
def test_eval_localization_failing_metrics_write_keeps_the_previous_metrics(tmp_path, monkeypatch, failure):
    from legion.cli import main

    root, pred_path = _eval_inputs(tmp_path)
    out = tmp_path / "eval"
    args = ["eval", "localization", "--pred", str(pred_path), "--gt", str(root), "--dataset", "synthscars"]
    args += ["--output-dir", str(out), "--workers", "1", "--no-plots"]
    assert main(args) == 0
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    assert {"metrics.json", "per_image.jsonl", "table.md"} <= set(before)

    if failure == "disk full at the rename":
        real_replace = os.replace

        def replace(src, dst):
            if Path(dst).name == "metrics.json":
                raise OSError(28, "No space left on device")
            real_replace(src, dst)

        monkeypatch.setattr(lio.os, "replace", replace)
        with pytest.raises(OSError, match="No space left"):
            main([*args, "--both-empty", "zero"])  # different protocol: a different metrics.json
    else:

        def fsync(fd):  # the data is in the temporary file, then the writer raises (not an OSError)
            raise RuntimeError("injected failure")

        monkeypatch.setattr(lio.os, "fsync", fsync)
        with pytest.raises(RuntimeError, match="injected failure"):  # not a LegionError: not swallowed
            main([*args, "--both-empty", "zero"])
    after = {p.name: p.read_bytes() for p in out.iterdir()}
    record, previous = json.loads(after.pop("run_info.json")), json.loads(before.pop("run_info.json"))
    if failure == "disk full at the rename":  # the run's own record says it failed, and why
        assert record["status"] == "failed" and "No space left" in record["error"]
    else:  # no write can succeed: the record is the previous run's, intact
        assert record == previous
    assert after == before  # metrics.json untouched, nothing new
    assert _leftovers(tmp_path) == []
