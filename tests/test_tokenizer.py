"""LegionTokenizer: the reference (transformers 4.28 slow LlamaTokenizer) behaviour, the tiny tokenizer
that follows the same rule, directory round trips and loading errors.

The ids of the real LLaMA tokenizer are checked against the reference stack in
test_tokenizer_reference.py; here the rule itself is checked on any SentencePiece model.
"""

from __future__ import annotations

import json
import logging

import pytest
import torch

from legion.model import builders
from legion.model import conversation as conv
from legion.model.tokenizer import LegionTokenizer, build_tiny_tokenizer, load_tokenizer
from tests.fixtures_model import SP_CORPUS, train_small_sentencepiece, write_glamm_sentencepiece_tokenizer

TINY_CORPUS = SP_CORPUS + [
    "The left hand has six fingers and the reflection in the mirror does not match the person.",
    "Upon examining the image. I have found the following artifacts.",
]
LONE_SPACE = "▁"


@pytest.fixture(scope="module")
def glamm_tokenizer_dir(tmp_path_factory):
    return write_glamm_sentencepiece_tokenizer(tmp_path_factory.mktemp("glamm_tok"))


@pytest.fixture(scope="module")
def tiny_tokenizer():
    return build_tiny_tokenizer(TINY_CORPUS)


# --- the rule, on the tiny tokenizer ------------------------------------------------------------
def test_tiny_tokenizer_has_llama_specials_and_legion_tokens_after_base(tiny_tokenizer):
    tok = tiny_tokenizer
    assert tok.convert_tokens_to_ids(["<unk>", "<s>", "</s>"]) == [0, 1, 2]
    assert tok.convert_tokens_to_ids(["<0x00>", "<0x01>"]) == [3, 4]  # byte fallback pieces as in LLaMA
    ids = conv.special_token_ids(tok, expect_glamm_ids=False)
    base = len(tok) - len(conv.SPECIAL_TOKENS)
    assert [ids.im_start, ids.im_end, ids.bbox, ids.point, ids.seg, ids.p_start, ids.p_end] == list(
        range(base, base + 7)
    )
    assert ids.pad == 0 and tok.pad_token == "<unk>" and tok.padding_side == "right"
    assert tok.eos_token_id == 2 and tok("hand").input_ids[0] == 1  # BOS added, no EOS


def test_whitespace_next_to_added_tokens_is_stripped(tiny_tokenizer):
    tok = tiny_tokenizer
    tokens = tok.tokenize("found: <p> the hand </p> [SEG]: the fingers")
    assert tokens[tokens.index("<p>") - 1] == ":"  # no lone ▁ before <p>
    assert tokens[tokens.index("<p>") + 1] == "▁the"  # the phrase starts with the dummy prefix
    assert tokens[tokens.index("</p>") - 1] == "▁hand" and tokens[tokens.index("</p>") + 1] == "[SEG]"
    assert tokens[tokens.index("[SEG]") + 1] == "▁:"  # each chunk is encoded on its own
    assert LONE_SPACE not in tokens
    # newlines, tabs and other whitespace count as whitespace too; glued tags give the same ids
    assert tok.encode("x\n\t<p>\u3000y </p>") == tok.encode("x<p>y</p>")
    assert tok.encode("<p> y </p> [SEG] z") == tok.encode("<p>y</p>[SEG]z")
    # </s> strips too (a space before the end of an answer disappears), inner spaces survive
    assert tok.encode("end </s>") == tok.encode("end</s>") and tok.tokenize("end </s>")[-1] == "</s>"
    assert LONE_SPACE in tok.tokenize("end  x")


def test_prompt_has_the_image_tokens_next_to_words(tiny_tokenizer):
    tok = tiny_tokenizer
    ids = conv.tokenize_with_image(conv.render_prompt(), tok)
    at = ids.index(conv.IMAGE_TOKEN_INDEX)
    assert tok.convert_ids_to_tokens(ids[at - 2 : at]) == ["▁The", "<im_start>"]
    assert tok.convert_ids_to_tokens(ids[at + 1]) == "<im_end>"
    assert tok.convert_ids_to_tokens(ids[at + 2]).startswith("▁pro")
    assert ids.count(tok.bos_token_id) == 1 and ids[0] == tok.bos_token_id


def test_conversation_labels_supervise_answer_and_eos_only(tiny_tokenizer):
    tok = tiny_tokenizer
    answer = f"I have found: {conv.tag_phrase('the hand')}: six fingers."
    ids, labels = conv.encode_conversation(tok, answer)
    prompt = conv.tokenize_with_image(conv.render_prompt(), tok)
    assert ids[: len(prompt)].tolist() == prompt and (labels[: len(prompt)] == conv.IGNORE_INDEX).all()
    supervised = ids[len(prompt) :].tolist()
    assert labels[len(prompt) :].tolist() == supervised and supervised[-1] == tok.eos_token_id
    assert supervised[:-1] == tok.encode(answer, add_special_tokens=False)
    # the hidden state that feeds SAM is the one of `</p>` (the token before [SEG])
    seg_at = supervised.index(tok.convert_tokens_to_ids(conv.SEG))
    assert supervised[seg_at - 1] == tok.convert_tokens_to_ids(conv.P_END)


def test_decode_joins_added_tokens_with_single_spaces(tiny_tokenizer):
    tok = tiny_tokenizer
    ids = tok.encode("I found: <p> the hand </p> [SEG]: fused.</s>", add_special_tokens=False)
    assert tok.decode(ids) == "I found: <p> the hand </p> [SEG]  : fused.</s>"
    assert tok.decode(ids, skip_special_tokens=True) == "I found: <p> the hand </p> [SEG] : fused."
    explanation, phrases = conv.parse_answer(tok.decode(ids))
    assert explanation == "I found: the hand : fused." and phrases == ["the hand"]
    assert tok.decode(tok.encode("Fused fingers, ß日!"), skip_special_tokens=True) == "Fused fingers, ß日!"


def test_unseen_characters_fall_back_to_bytes(tiny_tokenizer):
    ids = tiny_tokenizer.encode("ß日", add_special_tokens=False)
    assert 0 not in ids and all(3 <= i < 259 for i in ids if tiny_tokenizer.convert_ids_to_tokens(i) != LONE_SPACE)


def test_tiny_tokenizer_is_deterministic_and_round_trips_through_a_directory(tiny_tokenizer, tmp_path):
    again = build_tiny_tokenizer(TINY_CORPUS)
    assert again.model_proto == tiny_tokenizer.model_proto and again.get_vocab() == tiny_tokenizer.get_vocab()
    tiny_tokenizer.save_pretrained(tmp_path)
    assert {p.name for p in tmp_path.iterdir()} == {
        "tokenizer.model",
        "added_tokens.json",
        "special_tokens_map.json",
        "tokenizer_config.json",
    }
    added = json.loads((tmp_path / "added_tokens.json").read_text())
    assert list(added) == conv.SPECIAL_TOKENS
    loaded = load_tokenizer(tmp_path)
    assert isinstance(loaded, LegionTokenizer)
    text = conv.render_conversation(f"I have found: {conv.tag_phrase('the left hand')}: six fingers.")
    assert loaded(text).input_ids == tiny_tokenizer(text).input_ids
    assert len(loaded) == len(tiny_tokenizer) and loaded.pad_token_id == 0
    assert loaded.clean_up_tokenization_spaces is False


def test_tiny_corpus_gives_a_small_vocabulary():
    corpus = builders.tiny_tokenizer_corpus()
    assert conv.GCG_QUESTION in corpus and conv.SYSTEM in corpus
    tok = builders.tiny_tokenizer()
    assert 259 + 7 < len(tok) <= 4096 + 7
    assert len(conv.tokenize_with_image(conv.render_prompt(), tok)) < 160  # whole words, not characters


# --- GLaMM-style directories --------------------------------------------------------------------
def test_glamm_sentencepiece_dir_gives_glamm_ids(glamm_tokenizer_dir):
    tok = load_tokenizer(glamm_tokenizer_dir)
    assert isinstance(tok, LegionTokenizer) and len(tok) == 32007
    ids = conv.special_token_ids(tok)  # asserts GLaMM's 32000..32006 for a 32000-piece base vocabulary
    assert ids.seg == 32004 and ids.p_start == 32005 and ids.p_end == 32006 and ids.im_start == 32000
    assert (tok.unk_token_id, tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (0, 1, 2, 0)
    assert tok.model_max_length == 1536 and tok.clean_up_tokenization_spaces is False


def test_plain_text_is_plain_sentencepiece(glamm_tokenizer_dir):
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_proto=(glamm_tokenizer_dir / "tokenizer.model").read_bytes())
    tok = load_tokenizer(glamm_tokenizer_dir)
    for text in [conv.SYSTEM, conv.GCG_QUESTION, "The shadow falls the wrong way.", "zq 123 ß"]:
        assert tok(text, add_special_tokens=False).input_ids == sp.encode(text)
    assert torch.equal(conv.encode_prompt(tok), torch.tensor(conv.tokenize_with_image(conv.render_prompt(), tok)))


def test_added_tokens_must_continue_the_vocabulary(tmp_path):
    model = train_small_sentencepiece()
    import sentencepiece as spm

    base = spm.SentencePieceProcessor(model_proto=model).get_piece_size()
    ok = LegionTokenizer(model, {t: base + i for i, t in enumerate(conv.SPECIAL_TOKENS)})
    assert ok.convert_tokens_to_ids(conv.SPECIAL_TOKENS) == list(range(base, base + 7))
    with pytest.raises(ValueError, match="differ from GLaMM"):
        conv.special_token_ids(ok, expect_glamm_ids=True)
    with pytest.raises(ValueError, match="must continue"):
        LegionTokenizer(model, {"<p>": base + 1})


def test_legacy_tokenizer_json_directory_still_loads_with_a_warning(tmp_path, caplog):
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import LlamaTokenizer

    bpe = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True))
    bpe.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")
    bpe.train_from_iterator(
        SP_CORPUS, trainers.BpeTrainer(vocab_size=300, special_tokens=["<unk>", "<s>", "</s>"], show_progress=False)
    )
    state = json.loads(bpe.to_str())["model"]
    old = LlamaTokenizer(
        vocab=state["vocab"],
        merges=[tuple(m) if not isinstance(m, str) else tuple(m.split(" ")) for m in state["merges"]],
        legacy=False,
    )
    conv.add_special_tokens(old)
    old.save_pretrained(tmp_path)
    assert not (tmp_path / "tokenizer.model").exists()
    with caplog.at_level(logging.WARNING, logger="legion.model.tokenizer"):
        tok = load_tokenizer(tmp_path)
    assert "written before" in caplog.text
    assert tok("hand").input_ids[0] == tok.bos_token_id and tok.pad_token_id == tok.unk_token_id
    assert conv.special_token_ids(tok, expect_glamm_ids=False).seg == tok.convert_tokens_to_ids(conv.SEG)


def test_load_tokenizer_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="not found"):
        load_tokenizer(tmp_path / "missing")
    with pytest.raises(FileNotFoundError, match="no tokenizer.model"):
        load_tokenizer(tmp_path)
