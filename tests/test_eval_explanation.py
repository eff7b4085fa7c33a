"""Explanation metrics: ROUGE-L worked examples of docs/metrics.md §5, CSS with the pinned local model."""

import numpy as np
import pytest

from legion.eval.explanation import CssScorer, clean_explanation, evaluate_explanations, rouge_l
from legion.eval.ground_truth import GroundTruthItem


@pytest.mark.parametrize(
    "reference, prediction, expected",
    [
        ("the cat sat on the mat", "the cat on the mat", 0.909091),
        ("Two cats sitting", "two cat sits", 1.0),
        ("Man's right ear.:The man's right ear is tilted.", "Man's right ear. :The man's ear is tilted", 0.952381),
    ],
)
def test_rouge_worked_examples(reference, prediction, expected):
    assert rouge_l(reference, prediction) == pytest.approx(expected, abs=1e-6)
    assert rouge_l(reference, prediction, exact=True) == pytest.approx(expected, abs=1e-6)


def test_fast_rouge_equals_rouge_score_exactly(synthscars_sample_path):
    """The bit-parallel LCS path gives rouge-score's numbers bit for bit (real captions, shuffled
    pairs, truncations, punctuation / unicode / repeated-word texts)."""
    import json
    import random

    captions = [next(iter(r.values()))["caption"] for r in json.loads(synthscars_sample_path.read_text())]
    rng = random.Random(0)
    pairs = [(c, captions[rng.randrange(len(captions))]) for c in captions[:40]]
    pairs += [(c, " ".join(c.split()[: rng.randrange(1, 40)])) for c in captions[40:70]]
    words = [
        "the",
        "cat",
        "cats",
        "sitting",
        "sits",
        "ear",
        "ears",
        "is",
        "a",
        "man's",
        "hand",
        "running",
        "ÉTÉ",
        "—",
        "x2",
    ]
    pairs += [
        (" ".join(rng.choices(words, k=rng.randrange(1, 30))), " ".join(rng.choices(words, k=rng.randrange(1, 30))))
        for _ in range(100)
    ]
    pairs += [("!!! ...", "the cat"), ("a a a a", "a"), ("Ünïcode only", "unicode")]
    for ref, pred in pairs:
        for stem in (True, False):
            assert rouge_l(ref, pred, use_stemmer=stem) == rouge_l(ref, pred, use_stemmer=stem, exact=True), (ref, pred)


def test_lcs_length_small_cases():
    from legion.eval.explanation import lcs_length

    assert lcs_length("abcbdab", "bdcaba") == 4
    assert lcs_length("aaaa", "aa") == 2 and lcs_length("", "abc") == 0 and lcs_length("abc", "xyz") == 0


def test_rouge_without_stemming_and_argument_order():
    assert rouge_l("Two cats sitting", "two cat sits", use_stemmer=False) == pytest.approx(1 / 3, abs=1e-6)
    # P = LCS/|pred|, R = LCS/|ref|: F is symmetric, but the scorer is called (reference, prediction)
    from legion.eval.explanation import _rouge_scorer

    s = _rouge_scorer(True).score("the cat sat on the mat", "the cat on the mat")["rougeL"]
    assert s.precision == pytest.approx(1.0) and s.recall == pytest.approx(5 / 6)


def test_empty_text_scores_zero():
    assert rouge_l("", "anything") == 0.0 and rouge_l("ref", "   ") == 0.0


def test_clean_explanation():
    raw = "'The <p> left hand </p> [SEG] has  six\nfingers.</s>'"
    assert clean_explanation(raw) == "The left hand has six fingers."
    assert clean_explanation(clean_explanation(raw)) == clean_explanation(raw)
    assert clean_explanation(None) == ""


def _gt():
    return {
        "a.png": GroundTruthItem("a.png", reference_text="the cat sat  on the mat", content_type="Animal"),
        "b.png": GroundTruthItem("b.png", reference_text="Two cats sitting", content_type="Animal"),
        "c.png": GroundTruthItem("c.png", reference_text="A man with six fingers", content_type="Human"),
        "n.png": GroundTruthItem("n.png", reference_text=None),
    }


def test_evaluate_without_css_counts_missing_and_real():
    preds = [
        {"image": "a.png", "verdict": "fake", "explanation": "the <p>cat</p> [SEG] on the mat"},
        {"image": "b.png", "verdict": "real", "explanation": "Two cats sitting"},  # real -> empty
    ]
    res = evaluate_explanations(preds, _gt(), css=None, dataset="synthscars")
    m = res.metrics
    assert m["overall"]["num_images"] == 3 and m["overall"]["num_missing"] == 1
    assert m["overall"]["num_empty_prediction"] == 2
    assert m["overall"]["rouge_l"] == pytest.approx(100 * 0.909091 / 3, abs=1e-4)
    assert m["overall"]["css"] is None and m["protocol"]["css_model"] is None
    assert m["images_without_reference"] == ["n.png"] and m["missing_images"] == ["c.png"]
    assert m["by_content_type"]["Human"]["rouge_l"] == 0.0


@pytest.fixture(scope="module")
def css():
    return CssScorer()


def test_css_pinned_model(css):
    assert "all-MiniLM-L6-v2" in css.name
    refs = ["The man's right ear is tilted.", "The man's right ear is tilted.", "The hand has six fingers.", ""]
    preds = [
        "The man's right ear is tilted.",
        "The right ear of the man is at a wrong angle.",
        "A red car parked on the street at night.",
        "something",
    ]
    s = css.score(refs, preds)
    assert s[0] == pytest.approx(1.0, abs=1e-5)
    assert s[1] > s[2] + 0.3  # paraphrase far above an unrelated sentence
    assert s[3] == 0.0
    assert np.all(s <= 1.0)


def test_evaluate_with_css_records_model(css):
    preds = [
        {"image": n, "verdict": "fake", "explanation": item.reference_text}
        for n, item in _gt().items()
        if item.reference_text
    ]
    m = evaluate_explanations(preds, _gt(), css=css).metrics
    assert m["overall"]["css"] == pytest.approx(100.0, abs=1e-3)
    assert m["overall"]["rouge_l"] == pytest.approx(100.0)
    assert m["protocol"]["css_model"] == css.name and m["protocol"]["css_model_path"]
    assert m["protocol"]["css_max_seq_length"] == css.model.max_seq_length > 0
