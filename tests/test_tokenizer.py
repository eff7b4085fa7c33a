"""Tiny tokenizer (trained offline with `tokenizers`) and GLaMM-style SentencePiece tokenizer loading."""

from __future__ import annotations

import json

import pytest
import torch

from legion.model import conversation as conv
from legion.model.tokenizer import BYTE_TOKENS, build_tiny_tokenizer, default_corpus, load_tokenizer
from tests.fixtures_model import SP_CORPUS, train_small_sentencepiece, write_glamm_sentencepiece_tokenizer

# Measured once with the fixed SP_CORPUS model (sentencepiece 0.2.x trainer, transformers 5 conversion),
# then pinned: a tokenizer upgrade that changes them changes where [SEG] and the answer boundary land.
GOLDEN_PROMPT_IDS = [
    1, 329, 481, 519, 259, 520, 355, 280, 265, 537, 542, 360, 568, 317, 360, 501, 522, 565, 358, 565,
    280, 516, 518, 381, 267, 355, 586, 555, 535, 568, 414, 390, 597, 584, 317, 550, 32000, -200, 32001,
    386, 296, 265, 271, 572, 269, 306, 551, 571, 285, 267, 277, 554, 274, 340, 545, 489, 525, 259, 358,
    527, 285, 295, 291, 488, 506, 565, 540, 359, 295, 308, 551, 568, 567, 301, 524, 521, 515, 565, 539,
    285, 359, 484, 565, 280, 526, 575, 536, 356, 326, 538, 295, 308, 551, 568, 567, 301, 529, 523, 565,
    533, 565, 448, 387, 351, 326, 280, 361, 295, 308, 551, 568, 567, 301, 500, 575, 512, 361, 565, 504,
    575, 382, 565, 528, 508, 356, 565, 280, 531, 534, 357, 388, 513, 352, 541, 543, 503, 473, 267, 544,
    505, 285, 267, 514, 568, 329, 548, 547, 573, 546, 573, 584]
# "<p> x </p> [SEG]:y" -> <s> <p> ▁ x ▁ </p> ▁ [SEG] : y  (a lone ▁ survives before each added token)
GOLDEN_TAGGED_IDS = [1, 32005, 550, 576, 550, 32006, 550, 32004, 584, 570]

TINY_CORPUS = SP_CORPUS + [
    "The left hand has six fingers and the reflection in the mirror does not match the person.",
    "Upon examining the image. I have found the following artifacts.",
]


@pytest.fixture(scope="module")
def glamm_tokenizer_dir(tmp_path_factory):
    return write_glamm_sentencepiece_tokenizer(tmp_path_factory.mktemp("glamm_tok"))


@pytest.fixture(scope="module")
def tiny_tokenizer():
    return build_tiny_tokenizer(TINY_CORPUS)


# --- tiny tokenizer -----------------------------------------------------------------------
def test_tiny_tokenizer_has_llama_specials_and_legion_tokens_after_base(tiny_tokenizer):
    tok = tiny_tokenizer
    assert tok.convert_tokens_to_ids(["<unk>", "<s>", "</s>"]) == [0, 1, 2]
    assert tok.convert_tokens_to_ids(BYTE_TOKENS[:2]) == [3, 4]  # byte fallback tokens like LLaMA
    ids = conv.special_token_ids(tok, expect_glamm_ids=False)
    base = len(tok) - len(conv.SPECIAL_TOKENS)
    assert [ids.im_start, ids.im_end, ids.bbox, ids.point, ids.seg, ids.p_start, ids.p_end] == list(
        range(base, base + 7))
    assert ids.pad == 0 and tok.pad_token == "<unk>" and tok.padding_side == "right"
    assert tok.eos_token_id == 2 and tok("hand").input_ids[0] == 1  # BOS added, no EOS


def test_tiny_tokenizer_keeps_tags_whole_and_words_short(tiny_tokenizer):
    tok = tiny_tokenizer
    ids = tok("<p> the hand </p> [SEG]: fused").input_ids
    tokens = tok.convert_ids_to_tokens(ids)
    for tag in ("<p>", "</p>", "[SEG]"):
        assert tokens.count(tag) == 1
    # frequent corpus words are single tokens, so tiny training sequences stay short
    assert tok("the hand", add_special_tokens=False).input_ids == tok.convert_tokens_to_ids(["▁the", "▁hand"])
    # characters never seen in training fall back to bytes, never to <unk>
    unseen = tok("ß日", add_special_tokens=False).input_ids
    assert 0 not in unseen and all(3 <= i < 259 for i in unseen if tok.convert_ids_to_tokens(i) != "▁")
    assert tok.decode(tok("Fused fingers, ß日!").input_ids, skip_special_tokens=True) == "Fused fingers, ß日!"


def test_tiny_tokenizer_is_deterministic_and_round_trips_through_a_directory(tiny_tokenizer, tmp_path):
    again = build_tiny_tokenizer(TINY_CORPUS)
    assert again.get_vocab() == tiny_tokenizer.get_vocab()
    tiny_tokenizer.save_pretrained(tmp_path)
    loaded = load_tokenizer(tmp_path)
    text = conv.render_conversation(f"I have found: {conv.tag_phrase('the left hand')}: six fingers.")
    assert loaded(text).input_ids == tiny_tokenizer(text).input_ids
    assert len(loaded) == len(tiny_tokenizer) and loaded.pad_token_id == 0 and loaded.padding_side == "right"
    # the conversation encoder finds the answer boundary with this tokenizer
    ids, labels = conv.encode_conversation(loaded, f"{conv.tag_phrase('hand')}: fused.")
    supervised = ids[labels != conv.IGNORE_INDEX]
    assert supervised[-1].item() == 2 and conv.SEG in loaded.convert_ids_to_tokens(supervised.tolist())


def test_default_corpus_gives_a_small_vocabulary():
    corpus = default_corpus()
    assert conv.GCG_QUESTION in corpus and conv.SYSTEM in corpus
    tok = build_tiny_tokenizer()
    assert 259 + 7 < len(tok) <= 4096 + 7
    prompt_ids = conv.tokenize_with_image(conv.render_prompt(), tok)
    assert len(prompt_ids) < 130  # whole words, not characters


# --- GLaMM / LEGION SentencePiece tokenizer ------------------------------------------------
def test_glamm_sentencepiece_dir_gives_glamm_ids(glamm_tokenizer_dir):
    tok = load_tokenizer(glamm_tokenizer_dir)
    assert len(tok) == 32007
    ids = conv.special_token_ids(tok)  # asserts GLaMM's 32000..32006 for a 32000-piece base vocabulary
    assert ids.seg == 32004 and ids.p_start == 32005 and ids.p_end == 32006 and ids.im_start == 32000
    assert tok.convert_tokens_to_ids(conv.SEG) == 32004
    assert (tok.unk_token_id, tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (0, 1, 2, 0)
    assert tok.padding_side == "right"


def test_glamm_tokenizer_golden_ids(glamm_tokenizer_dir):
    tok = load_tokenizer(glamm_tokenizer_dir)
    assert conv.tokenize_with_image(conv.render_prompt(), tok) == GOLDEN_PROMPT_IDS
    assert tok("<p> x </p> [SEG]:y").input_ids == GOLDEN_TAGGED_IDS
    assert torch.equal(conv.encode_prompt(tok), torch.tensor(GOLDEN_PROMPT_IDS))


def test_glamm_tokenizer_matches_sentencepiece_on_plain_text(glamm_tokenizer_dir):
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_proto=(glamm_tokenizer_dir / "tokenizer.model").read_bytes())
    tok = load_tokenizer(glamm_tokenizer_dir)
    for text in [conv.SYSTEM, conv.GCG_QUESTION, "The shadow falls the wrong way.", "zq 123 ß"]:
        assert tok(text, add_special_tokens=False).input_ids == sp.encode(text)


def test_unpadded_sentencepiece_puts_added_tokens_right_after_base(tmp_path):
    (tmp_path / "tokenizer.model").write_bytes(train_small_sentencepiece())
    import sentencepiece as spm

    base = spm.SentencePieceProcessor(model_proto=(tmp_path / "tokenizer.model").read_bytes()).get_piece_size()
    (tmp_path / "added_tokens.json").write_text(json.dumps({t: base + i for i, t in enumerate(conv.SPECIAL_TOKENS)}))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "LlamaTokenizer", "legacy": False}))
    tok = load_tokenizer(tmp_path)
    assert tok.convert_tokens_to_ids(conv.SPECIAL_TOKENS) == list(range(base, base + 7))
    assert tok("hand").input_ids[0] == 1  # BOS although this tokenizer_config.json does not ask for it
    with pytest.raises(ValueError, match="differ from GLaMM"):
        conv.special_token_ids(tok, expect_glamm_ids=True)


def test_load_tokenizer_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="not found"):
        load_tokenizer(tmp_path / "missing")
    with pytest.raises(FileNotFoundError, match="tokenizer.json or tokenizer.model"):
        load_tokenizer(tmp_path)


def test_glamm_tokenizer_encodes_a_training_conversation(glamm_tokenizer_dir):
    tok = load_tokenizer(glamm_tokenizer_dir)
    ids, labels = conv.encode_conversation(tok, "I have found: <p> x </p> [SEG]:y")
    assert ids[: len(GOLDEN_PROMPT_IDS)].tolist() == GOLDEN_PROMPT_IDS
    supervised = ids[labels != conv.IGNORE_INDEX].tolist()
    assert (labels[: len(GOLDEN_PROMPT_IDS)] == conv.IGNORE_INDEX).all()
    assert supervised[-1] == 2 and supervised.count(32004) == 1
    # measured once, then pinned: "▁ I ▁ha ve ▁f ou nd : ▁" + the tagged snippet (no BOS) + </s>
    assert supervised == [550, 588, 379, 372, 310, 368, 367, 584, 550] + GOLDEN_TAGGED_IDS[1:] + [2]
