"""Step 1 of the tokenizer golden fixture: the texts to tokenize (run with the project's .venv).

Writes tests/golden/tokenizer_cases.json: the generation prompt and, for every case, the full
training conversation string, rendered by `legion.model.conversation` (the llava_v1 template):

- hand-written answers that probe whitespace around added tokens: phrases with and without inner
  spaces, several `[SEG]`, punctuation right after `[SEG]`, newlines, curly quotes and dashes,
  digits, an answer that starts with `<p>` and one that ends with `[SEG]`;
- the answer of every record of the real 119-record SynthScars annotation sample, built by our
  SynthScars reader exactly as training builds it.

Step 2 (`tokenizer_reference_428.py`) tokenizes these strings with the reference stack. The strings,
not our code, are the input of step 2, so the golden ids do not depend on the code under test.

    .venv/bin/python scripts/golden/tokenizer_cases.py
"""

from __future__ import annotations

import json
from pathlib import Path

from legion.data.synthscars import build_answer, load_annotations
from legion.model import conversation as conv

REPO = Path(__file__).resolve().parents[2]
SAMPLE = REPO / "tests" / "data" / "synthscars_annotation_sample.json"
OUT = REPO / "tests" / "golden" / "tokenizer_cases.json"

HAND_WRITTEN = {
    "single_phrase_colon": f"{conv.tag_phrase('the left hand')}: the fingers are fused.",
    "phrase_without_inner_space": f"{conv.tag_phrase('hand')}:six fingers",
    "tags_without_spaces": "<p>text</p> [SEG] is",
    "tags_glued": "<p>text</p>[SEG]is",
    "several_seg_and_punctuation": (
        f"I have found: {conv.tag_phrase('the ear')}. {conv.tag_phrase('the eyes')}, "
        f"{conv.tag_phrase('the zipper')}; and {conv.tag_phrase('the shadow')}!"
    ),
    "punctuation_after_seg": "<p> a </p> [SEG]: b <p> c </p> [SEG]. d <p> e </p> [SEG], f <p> g </p> [SEG]; h",
    "newlines": (
        "Upon examining the image. I have found: a cat.\nTo elaborate, I have found the following artifacts. "
        "<p> Cat's tail. </p> [SEG]:The tail splits in two.\n<p> whiskers </p> [SEG]\nThey float."
    ),
    "non_ascii_quotes_dashes": (
        "The sign reads “OPEN” — but ‘closed’ – the café’s façade… <p> the “sign” </p> [SEG]:naïve text 日本"
    ),
    "digits": f"{conv.tag_phrase('the 6th finger')}: 6 fingers, 2 thumbs, 3.5x too long, year 2024.",
    "starts_with_tag": f"{conv.tag_phrase('Man’s right ear.')}:The ear is tilted.",
    "ends_with_seg": f"I have found the following artifacts. {conv.tag_phrase('the hand')}",
    "double_spaces_inside": "Two  spaces  here <p>  padded phrase  </p> [SEG] :  spaced colon",
    "angle_brackets_not_tags": "a <b>bold</b> claim and x < y > z with <p> a tag </p> [SEG].",
    "tabs_and_trailing_space": "tab\there <p> p </p> [SEG]\t: end ",
    "llama_specials_in_text": "x </s> y <s> z <unk> w <p> v </p> [SEG]",
    "unicode_whitespace": "a\u00a0<p>\u3000b\u2003</p>\x1c[SEG]\u200b: c\u0085<p>\td </p> [SEG]",
    "adjacent_segs_and_contractions": "it isn't <p> x </p> [SEG][SEG] , they're 'quoted' words ?",
}


def main() -> None:
    records, _ = load_annotations(SAMPLE)
    cases = [{"name": name, "answer": answer} for name, answer in HAND_WRITTEN.items()]
    for record in records:
        answer, refs = build_answer(record)
        if refs:  # records without a located ref are never training samples
            cases.append({"name": f"synthscars_sample_{record.id}", "answer": answer})
    for case in cases:
        case["conversation"] = conv.render_conversation(case["answer"])
    out = {
        "about": "texts for the tokenizer golden fixture; made by scripts/golden/tokenizer_cases.py",
        "prompt": conv.render_prompt(),
        "assistant_separator": f" {conv.ROLES[1]}: ",
        "cases": cases,
    }
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps(out, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    print(f"{len(cases)} cases -> {OUT}")


if __name__ == "__main__":
    main()
