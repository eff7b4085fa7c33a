"""`legion data check`: the real annotation sample, missing/bad images, unusable files."""

from __future__ import annotations

import json
import statistics

import numpy as np
import pytest
from PIL import Image

from legion.cli import main
from legion.data.check import check_split
from legion.data.synthscars import load_annotations, rasterize_polygons, resolve_image_path
from tests.fixtures_data import write_sample_root


def _run(capsys, *argv) -> tuple[int, str]:
    code = main(["data", "check", *argv])
    return code, capsys.readouterr().out


def test_sample_with_images_is_reported_and_usable(synthscars_sample_root, synthscars_sample_path, capsys):
    code, out = _run(capsys, "--root", str(synthscars_sample_root), "--json", "--workers", "2")
    summary = json.loads(out)
    assert code == 0 and summary["usable"]
    assert (summary["records"], summary["refs"], summary["records_without_refs"]) == (119, 260, 1)
    assert summary["annotation_errors"] == {} and summary["annotation_warnings"] == {"no_refs": 1}
    assert summary["images"]["found"] == summary["images"]["distinct"] == 119
    assert summary["images"]["missing"] == 0 and summary["images"]["unreadable"] == {}
    assert summary["images"]["conversions"] == {}
    assert summary["spans"] == {"located": {"anchored": 260}, "dropped": {}}
    assert summary["unusable_records"] == {"no_grounded_ref": 1} and summary["usable_records"] == 118
    # mask areas: independent recomputation from full rasterized masks
    records, _ = load_annotations(synthscars_sample_path)
    ref_areas, union_areas = [], []
    for record in records:
        if not record.refs:
            continue
        path = resolve_image_path(synthscars_sample_root, "train", record.img_file_name)
        width, height = Image.open(path).size
        masks = [rasterize_polygons(r.polygons, height, width) for r in record.refs]
        ref_areas += [m.mean() for m in masks]
        union_areas.append(np.logical_or.reduce(masks).mean())
    got = summary["masks"]
    assert got["ref_area_fraction"]["count"] == 260 and got["union_area_fraction"]["count"] == 118
    assert got["ref_area_fraction"]["median"] == pytest.approx(statistics.median(ref_areas), abs=1e-12)
    assert got["union_area_fraction"]["mean"] == pytest.approx(statistics.fmean(union_areas), abs=1e-12)
    assert got["union_area_fraction"]["max"] == pytest.approx(max(union_areas), abs=1e-12)


def test_text_summary(synthscars_sample_root, capsys):
    code, out = _run(capsys, "--root", str(synthscars_sample_root), "--quick")
    assert code == 0
    assert "records           119 (of 119 entries; 1 without refs)" in out
    assert "refs              260" in out and "119 found / 119 distinct, 0 missing" in out
    assert "headers and end markers" in out and "verdict: USABLE" in out
    assert "record 1547" in out  # problems name the record


def test_sample_without_images_is_not_usable(synthscars_sample_path, tmp_path, capsys):
    (tmp_path / "train" / "annoations").mkdir(parents=True)  # the README's spelling
    (tmp_path / "train" / "annoations" / "train.json").write_text(synthscars_sample_path.read_text())
    code, out = _run(capsys, "--root", str(tmp_path), "--json", "--quick")
    summary = json.loads(out)
    assert code == 1 and not summary["usable"]
    assert summary["images"]["missing"] == 119 and summary["usable_records"] == 0
    assert summary["images"]["missing_examples"][0].startswith("missing image: record 1172")


def test_bad_images_and_escapes_are_counted(synthscars_sample_path, tmp_path):
    root = write_sample_root(synthscars_sample_path, tmp_path)
    data = json.loads((root / "train" / "annotations" / "train.json").read_text())
    first = next(iter(data[0].values()))
    (root / "train" / "images" / first["img_file_name"].rsplit("/", 1)[-1]).write_bytes(b"not an image")
    second = next(iter(data[1].values()))
    second["img_file_name"] = "../../outside.png"
    (root / "train" / "annotations" / "train.json").write_text(json.dumps(data))
    summary = check_split(root, "train", workers=1)
    assert summary["images"]["unreadable"] == {"corrupt": 1} and summary["images"]["path_escapes"] == 1
    assert summary["unusable_records"] == {"no_grounded_ref": 1, "image_unreadable": 1, "path_escape": 1}
    assert summary["usable"] and summary["unusable_fraction"] == pytest.approx(3 / 119)  # 2.5% <= 5%
    strict = check_split(root, "train", workers=1, max_unusable_fraction=0.02)
    assert not strict["usable"]


def test_unusable_annotation_file_is_fatal(tmp_path, capsys):
    code, out = _run(capsys, "--root", str(tmp_path), "--split", "test")
    assert code == 1 and "FATAL" in out and "annotations/test.json" in out
    (tmp_path / "test" / "annotations").mkdir(parents=True)
    (tmp_path / "test" / "annotations" / "test.json").write_text("[{")
    code, out = _run(capsys, "--root", str(tmp_path), "--split", "test", "--json")
    assert code == 1 and "malformed JSON" in json.loads(out)["fatal"]
