"""Controller inputs (cases), masks from prediction records, per-case folders, summary and HTML page."""

import json
import re
from html.parser import HTMLParser

import numpy as np
import pytest

from legion.controller.cases import CaseError, CaseWriter, has_artifact, read_cases, record_masks
from legion.controller.report import case_summary, write_html, write_summary
from legion.record import PredictionRecord
from legion.utils.rle import mask_to_rle


def _png(path, size=(12, 10)):
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.zeros((size[1], size[0], 3), np.uint8)).save(path)


def test_read_cases_in_all_formats(tmp_path):
    _png(tmp_path / "imgs" / "a b.png")
    _png(tmp_path / "imgs" / "sub" / "c.png")
    (tmp_path / "p.txt").write_text("a cat\n\n# comment\n  a dog  \n")
    cases = read_cases(tmp_path / "p.txt")
    assert [(c.case_id, c.prompt, c.image_path) for c in cases] == [
        ("prompt_0001", "a cat", None),
        ("prompt_0002", "a dog", None),
    ]
    (tmp_path / "m.json").write_text(json.dumps({"a b.png": "a cat", "sub/c.png": "a dog"}))
    cases = read_cases(tmp_path / "m.json", image_root=tmp_path / "imgs", require_images=True)
    assert [c.case_id for c in cases] == ["a_b", "c"]
    assert cases[1].image_path == (tmp_path / "imgs" / "sub" / "c.png").resolve()
    (tmp_path / "l.jsonl").write_text('{"prompt": "x", "id": "same"}\n{"prompt": "y", "id": "same"}\n')
    assert [c.case_id for c in read_cases(tmp_path / "l.jsonl")] == ["same", "same_2"]
    assert len(read_cases(tmp_path / "l.jsonl", limit=1)) == 1


@pytest.mark.parametrize(
    "content, message",
    [
        ({"../secret.png": "p"}, "leaves the image root"),
        ({"/etc/passwd": "p"}, "absolute image path"),
        ({"missing.png": "p"}, "image not found"),
        ({"a.png": ""}, "no non-empty 'prompt'"),
        ([{"prompt": "p"}], "has no 'image'"),
    ],
)
def test_read_cases_rejects_bad_entries(tmp_path, content, message):
    _png(tmp_path / "secret.png")
    _png(tmp_path / "root" / "a.png")
    (tmp_path / "root" / "in.json").write_text(json.dumps(content))
    with pytest.raises(CaseError, match=message):
        read_cases(tmp_path / "root" / "in.json", require_images=True)


def test_read_cases_rejects_unknown_formats(tmp_path):
    (tmp_path / "x.csv").write_text("a")
    with pytest.raises(CaseError, match="unsupported"):
        read_cases(tmp_path / "x.csv")
    (tmp_path / "bad.jsonl").write_text("{not json\n")
    with pytest.raises(CaseError, match="bad.jsonl:1"):
        read_cases(tmp_path / "bad.jsonl")


def test_record_masks_falls_back_per_phrase():
    a = np.zeros((6, 8), np.uint8)
    a[1:3, 1:3] = 1
    b = np.zeros((6, 8), np.uint8)
    b[4, 5:8] = 1
    record = PredictionRecord(
        verdict="fake", masks=[mask_to_rle(a), {"size": [6, 8], "counts": 12345}, mask_to_rle(b)], union_mask=None
    )
    union, phrases, notes = record_masks(record, 6, 8)
    assert len(phrases) == 2 and len(notes) == 1 and "mask 1 skipped" in notes[0]
    assert np.array_equal(union, a | b) and has_artifact(record, union)
    # a record's own union wins when it decodes; a mismatched size is resized to the image
    record = PredictionRecord(verdict="fake", masks=[], union_mask=mask_to_rle(np.ones((3, 4), np.uint8)))
    union, _, _ = record_masks(record, 6, 8)
    assert union.shape == (6, 8) and union.all()
    assert not has_artifact(PredictionRecord(verdict="real"), union)
    assert not has_artifact(PredictionRecord(verdict="fake"), np.zeros((6, 8), np.uint8))


class _Sources(HTMLParser):
    def __init__(self):
        super().__init__()
        self.sources = []

    def handle_starttag(self, tag, attrs):
        if tag == "img":
            self.sources.append(dict(attrs)["src"])


def test_case_folder_summary_and_offline_html(tmp_path):
    writer = CaseWriter(tmp_path, "case<1>")
    rounds = []
    for index, score in enumerate([0.20, 0.30, 0.25]):
        image = np.full((10, 12, 3), 40 * index, np.uint8)
        union = np.zeros((10, 12), np.uint8)
        union[:5] = 1
        record = PredictionRecord(verdict="fake", explanation=f"round {index}: <b>hand</b> & fingers", phrases=["hand"])
        rounds.append(
            writer.write_round(index, image, f"prompt {index}", record, score, union, [union], {"has_artifact": True})
        )
    folder = tmp_path / "cases" / "case<1>" / "round_01"
    assert sorted(p.name for p in folder.iterdir()) == [
        "analysis.json",
        "image.png",
        "mask_00.png",
        "mask_union.png",
        "prompt.txt",
    ]
    analysis = json.loads((folder / "analysis.json").read_text())
    assert analysis["round"]["score"] == 0.30 and analysis["round"]["artifact_fraction"] == 0.5
    summary = case_summary("case<1>", "a cat", None, rounds, best_round=1, stop_reason="no_improvement", scorer="clip")
    assert (summary["pre_score"], summary["post_score"], summary["last_score"]) == (0.20, 0.30, 0.25)
    other = case_summary(
        "b", "a dog", None, [dict(rounds[0], score=0.40), dict(rounds[1], score=0.40)], 0, "no_artifact", "clip"
    )
    aggregate = write_summary(tmp_path, [summary, other], "clip", "regenerate")
    # per-image gains +50 % and 0 % -> 25 %; means 0.30 -> 0.35 -> 16.7 %
    assert aggregate["mean_of_ratios"] == pytest.approx(0.25)
    assert aggregate["ratio_of_means"] == pytest.approx(0.35 / 0.30 - 1)
    assert aggregate["stop_reasons"] == {"no_artifact": 1, "no_improvement": 1}
    lines = (tmp_path / "summary.jsonl").read_text().splitlines()
    assert [json.loads(line)["case_id"] for line in lines] == ["case<1>", "b"]
    page = write_html(tmp_path, [summary, other], aggregate, "t")
    text = page.read_text()
    assert "&lt;b&gt;hand&lt;/b&gt; &amp; fingers" in text and "<b>hand</b>" not in text  # escaped
    assert "mean of per-image ratios" in text and "ratio of means" in text
    parser = _Sources()
    parser.feed(text)
    assert len(parser.sources) == 6
    for src in parser.sources:  # relative, existing, nothing fetched from outside
        assert not re.match(r"^[a-z]+:|^/", src) and (tmp_path / src).is_file()
    assert "http" not in text and "<script" not in text


def test_html_page_renders_in_a_browser(tmp_path):
    from tests.browser import open_page

    writer = CaseWriter(tmp_path, "case_a")
    rounds = [
        writer.write_round(
            k,
            np.full((10, 12, 3), 60 * k, np.uint8),
            "p",
            PredictionRecord(verdict="fake"),
            0.1 * (k + 1),
            np.ones((10, 12), np.uint8),
            [],
            {},
        )
        for k in range(2)
    ]
    summary = case_summary("case_a", "p", None, rounds, 1, "max_rounds", "clip")
    page = write_html(tmp_path, [summary], write_summary(tmp_path, [summary], "clip", "inpaint"), "t")
    result = open_page(page)
    assert result["errors"] == [] and result["broken"] == [] and len(result["images"]) == 3
