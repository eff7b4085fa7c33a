"""Step 2 of the tokenizer golden fixture: tokenize the cases with LEGION's own software stack.

LEGION's released weights were trained with transformers 4.28.0 and its slow SentencePiece
`LlamaTokenizer` (`use_fast=False`). This script must run in a scratch venv with exactly that
stack; it does not import the project (no torch needed):

    python3 -m venv /tmp/tf428 && /tmp/tf428/bin/pip install transformers==4.28.0 sentencepiece protobuf
    /tmp/tf428/bin/python scripts/golden/tokenizer_reference_428.py

It builds a tokenizer directory in GLaMM's layout around the real LLaMA `tokenizer.model`
(tests/data/llama_tokenizer/): `added_tokens.json` with `<im_start>`=32000 ... `</p>`=32006,
`special_tokens_map.json`, `tokenizer_config.json`, and loads it as the reference training script
does (`use_fast=False`, `model_max_length=1536`, right padding, pad = unk). For every case of
tests/golden/tokenizer_cases.json it records:

- `input_ids`: the conversation tokenized the llava way (split on `<image>`, each chunk tokenized,
  -200 between chunks, the BOS of every later chunk dropped);
- `labels`: the llava_v1 label masking (rounds split on `</s>`, the instruction part of each round
  ignored, its length measured by tokenizing the text up to `" ASSISTANT: "` minus 2);
- `decoded_answer`: `decode(answer ids, skip_special_tokens=False)`; also with
  `clean_up_tokenization_spaces=True` and with `skip_special_tokens=True`;
- `explanation`, `phrases`: the reference inference post-processing of the decoded text (newlines
  deleted, the text after the last "ASSISTANT: ", phrases between `<p>` and `</p>`, every `<...>`
  and `[SEG]` removed, whitespace collapsed, `'` stripped at both ends).

Output: tests/golden/tokenizer_transformers428.json (committed; the tests compare against it).
"""

from __future__ import annotations

import json
import re
import sys
import tempfile
from pathlib import Path

import transformers

REPO = Path(__file__).resolve().parents[2]
SP_MODEL = REPO / "tests" / "data" / "llama_tokenizer" / "tokenizer.model"
CASES = REPO / "tests" / "golden" / "tokenizer_cases.json"
OUT = REPO / "tests" / "golden" / "tokenizer_transformers428.json"

ADDED_TOKENS = ["<im_start>", "<im_end>", "<bbox>", "<point>", "[SEG]", "<p>", "</p>"]
IMAGE_TOKEN_INDEX, IGNORE_INDEX = -200, -100


def write_glamm_layout(folder: Path) -> None:
    (folder / "tokenizer.model").write_bytes(SP_MODEL.read_bytes())
    (folder / "added_tokens.json").write_text(json.dumps({t: 32000 + i for i, t in enumerate(ADDED_TOKENS)}))
    (folder / "special_tokens_map.json").write_text(
        json.dumps({"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "pad_token": "<unk>"})
    )
    (folder / "tokenizer_config.json").write_text(
        json.dumps(
            {
                "tokenizer_class": "LlamaTokenizer",
                "add_bos_token": True,
                "add_eos_token": False,
                "bos_token": "<s>",
                "eos_token": "</s>",
                "unk_token": "<unk>",
                "clean_up_tokenization_spaces": False,
                "model_max_length": 1536,
                "padding_side": "right",
                "sp_model_kwargs": {},
            }
        )
    )


def tokenize_with_image(text: str, tokenizer) -> list[int]:
    """The llava recipe: tokenize the chunks around `<image>`, put -200 between them, keep one BOS."""
    chunks = [tokenizer(chunk).input_ids for chunk in text.split("<image>")]
    ids = list(chunks[0])
    for chunk in chunks[1:]:
        ids.append(IMAGE_TOKEN_INDEX)
        ids.extend(chunk[1:] if chunk and chunk[0] == tokenizer.bos_token_id else chunk)
    return ids


def llava_v1_labels(conversation: str, input_ids: list[int], tokenizer, separator: str) -> tuple[list[int], bool]:
    """Labels as the reference's llava_v1 preprocessing computes them; (labels, lengths agreed)."""
    labels = list(input_ids)
    cursor = 1
    labels[:cursor] = [IGNORE_INDEX] * cursor
    for round_text in conversation.split("</s>"):
        if round_text == "":
            break
        parts = round_text.split(separator)
        if len(parts) != 2:
            break
        round_len = len(tokenize_with_image(round_text, tokenizer))
        instruction_len = len(tokenize_with_image(parts[0] + separator, tokenizer)) - 2
        labels[cursor : cursor + instruction_len] = [IGNORE_INDEX] * instruction_len
        cursor += round_len
    labels[cursor:] = [IGNORE_INDEX] * (len(labels) - cursor)
    agreed = cursor == len(input_ids)
    if not agreed:  # the reference then ignores the whole sample
        labels = [IGNORE_INDEX] * len(labels)
    return labels, agreed


def reference_postprocess(decoded: str) -> tuple[str, list[str]]:
    """The reference inference's text clean-up of the decoded output."""
    text = decoded.replace("\n", "").replace("  ", " ")
    text = text.split("ASSISTANT: ")[-1]
    phrases = [p.strip() for p in re.findall(r"<p>(.*?)</p>", text)]
    cleaned = re.sub(r"<.*?>", "", text).replace("[SEG]", "")
    cleaned = " ".join(cleaned.split()).strip("'").strip()
    return cleaned, phrases


def main() -> None:
    if transformers.__version__ != "4.28.0":
        sys.exit(f"needs transformers 4.28.0 (LEGION's pin), found {transformers.__version__}")
    spec = json.loads(CASES.read_text(encoding="utf-8"))
    with tempfile.TemporaryDirectory() as tmp:
        write_glamm_layout(Path(tmp))
        tokenizer = transformers.AutoTokenizer.from_pretrained(
            tmp, model_max_length=1536, padding_side="right", use_fast=False
        )
        tokenizer.pad_token = tokenizer.unk_token
        assert type(tokenizer).__name__ == "LlamaTokenizer", type(tokenizer)
        assert tokenizer.convert_tokens_to_ids(ADDED_TOKENS) == list(range(32000, 32007))
        prompt_ids = tokenize_with_image(spec["prompt"], tokenizer)
        results = []
        for case in spec["cases"]:
            ids = tokenize_with_image(case["conversation"], tokenizer)
            labels, agreed = llava_v1_labels(case["conversation"], ids, tokenizer, spec["assistant_separator"])
            answer_ids = [i for i, lab in zip(ids, labels) if lab != IGNORE_INDEX]
            decoded = tokenizer.decode(answer_ids, skip_special_tokens=False)
            decoded_clean_up = tokenizer.decode(
                answer_ids, skip_special_tokens=False, clean_up_tokenization_spaces=True
            )
            decoded_skip = tokenizer.decode(answer_ids, skip_special_tokens=True)
            full_text = tokenizer.decode([i for i in ids if i != IMAGE_TOKEN_INDEX], skip_special_tokens=False)
            explanation, phrases = reference_postprocess(full_text)
            results.append(
                {
                    "name": case["name"],
                    "input_ids": ids,
                    "labels": labels,
                    "lengths_agreed": agreed,
                    "tokens": tokenizer.convert_ids_to_tokens(answer_ids),
                    "decoded_answer": decoded,
                    "decoded_answer_clean_up": decoded_clean_up,
                    "decoded_answer_skip_special": decoded_skip,
                    "explanation": explanation,
                    "phrases": phrases,
                }
            )
    out = {
        "about": (
            "golden ids from LEGION's reference stack; made by scripts/golden/tokenizer_reference_428.py "
            "from tests/golden/tokenizer_cases.json"
        ),
        "stack": {
            "transformers": transformers.__version__,
            "tokenizer_class": type(tokenizer).__name__,
            "sentencepiece": __import__("sentencepiece").__version__,
        },
        "prompt_ids": prompt_ids,
        "cases": results,
    }
    OUT.write_text(json.dumps(out, ensure_ascii=False) + "\n", encoding="utf-8")
    print(f"{len(results)} cases -> {OUT}")


if __name__ == "__main__":
    main()
