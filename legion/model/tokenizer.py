"""Tokenizers: a tiny LLaMA-like tokenizer trained offline, and loading GLaMM/LEGION tokenizers.

Both end up as the same kind of object (transformers' tokenizers-backed `LlamaTokenizer`: BPE with
byte fallback, `▁` metaspace, `<unk>`=0, `<s>`=1, `</s>`=2, pad = unk, right padding), so every
piece of code downstream treats a tiny checkpoint exactly like a real one (spec/model.md §1).

- `build_tiny_tokenizer(corpus)`: trains a small BPE (a few thousand ids) with the `tokenizers`
  library on LEGION's prompt text plus captions, then adds LEGION's special tokens in GLaMM's
  order right after the base vocabulary.
- `load_tokenizer(path)`: our directories (`tokenizer.json`) and GLaMM/LEGION ones
  (SentencePiece `tokenizer.model` + `added_tokens.json`, converted by transformers).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Iterator
from pathlib import Path

from tokenizers import Tokenizer, models, pre_tokenizers, trainers
from transformers import AutoTokenizer, LlamaTokenizer, PreTrainedTokenizerBase

from legion.model import conversation as conv

UNK, BOS, EOS = "<unk>", "<s>", "</s>"
# LLaMA keeps the 256 byte tokens right after the three specials (ids 3..258) for byte fallback.
BYTE_TOKENS = [f"<0x{i:02X}>" for i in range(256)]
TINY_VOCAB_SIZE = 3072  # base BPE ids (specials + bytes + merges); small corpora may stop earlier
TINY_MODEL_MAX_LENGTH = 1536  # as in LEGION training (spec/model.md §1)


# --- corpus -------------------------------------------------------------------------------
def _toy_caption_texts() -> list[str]:
    from legion.data.toy import caption_corpus

    return list(caption_corpus())


def default_corpus() -> list[str]:
    """LEGION's prompts + every caption ToyScars can emit.

    Only text that ships with the package: the tiny tokenizer (and so a tiny checkpoint's vocabulary)
    must be the same on every machine.
    """
    answer = f"{conv.tag_phrase('the hand')}: the fingers are fused."
    texts = [
        conv.render_conversation(answer),
        conv.render_prompt(),
        conv.SYSTEM,
        conv.GCG_QUESTION,
        "Could you provide a detailed analysis of artifacts in this photo? Please output with interleaved "
        "segmentation masks for the corresponding parts of the answer.",
    ]
    return texts + _toy_caption_texts()


# --- tiny tokenizer -----------------------------------------------------------------------
def _without_special_tokens(texts: Iterable[str]) -> Iterator[str]:
    # LEGION's tags are added tokens; keep their characters out of the BPE statistics.
    for text in texts:
        for tok in conv.SPECIAL_TOKENS + [conv.IMAGE_PLACEHOLDER, EOS, BOS]:
            text = text.replace(tok, " ")
        yield text


def train_bpe(corpus: Iterable[str], vocab_size: int = TINY_VOCAB_SIZE) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """(vocab, merges) of a LLaMA-style BPE: specials 0..2, byte tokens 3..258, then merges.

    Trained on whitespace-split words (merges never span a `▁` boundary, like SentencePiece's
    `split_by_whitespace`), so the result behaves the same inside LlamaTokenizer's unsplit pipeline.
    """
    trainer_tok = Tokenizer(models.BPE(unk_token=UNK, byte_fallback=True, fuse_unk=True))
    trainer_tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always", split=True)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, min_frequency=2, show_progress=False,
        special_tokens=[UNK, BOS, EOS] + BYTE_TOKENS, limit_alphabet=200,
    )
    trainer_tok.train_from_iterator(_without_special_tokens(corpus), trainer=trainer)
    model_state = json.loads(trainer_tok.to_str())["model"]
    vocab = dict(model_state["vocab"])
    merges = [tuple(m.split(" ", 1)) if isinstance(m, str) else tuple(m) for m in model_state["merges"]]
    assert vocab[UNK] == 0 and vocab[BOS] == 1 and vocab[EOS] == 2 and vocab[BYTE_TOKENS[0]] == 3
    return vocab, merges


def finalize_tokenizer(tokenizer: PreTrainedTokenizerBase) -> PreTrainedTokenizerBase:
    """LEGION's conventions on any tokenizer: BOS prepended (LLaMA), right padding, pad = unk (id 0)."""
    tokenizer.padding_side = "right"
    bos = tokenizer.bos_token_id
    if bos is not None and tokenizer("a").input_ids[:1] != [bos] and hasattr(tokenizer, "update_post_processor"):
        # an old tokenizer_config.json without `add_bos_token` must not silently drop LLaMA's BOS
        tokenizer.add_bos_token = True
        tokenizer.update_post_processor()
    if tokenizer.unk_token is not None:
        tokenizer.pad_token = tokenizer.unk_token
    return tokenizer


def build_tiny_tokenizer(corpus: list[str] | None = None, vocab_size: int = TINY_VOCAB_SIZE) -> LlamaTokenizer:
    """Train a small LLaMA-like tokenizer offline and add LEGION's special tokens (GLaMM order).

    Returns a tokenizers-backed `LlamaTokenizer` (a PreTrainedTokenizerFast); `len(tokenizer)` is
    the model's vocabulary size; `save_pretrained(dir)` writes a normal tokenizer directory.
    """
    vocab, merges = train_bpe(default_corpus() if corpus is None else corpus, vocab_size)
    tokenizer = LlamaTokenizer(vocab=vocab, merges=merges, unk_token=UNK, bos_token=BOS, eos_token=EOS,
                               legacy=False, add_prefix_space=True, add_bos_token=True, add_eos_token=False,
                               model_max_length=TINY_MODEL_MAX_LENGTH)
    base = len(tokenizer)
    conv.add_special_tokens(tokenizer)
    ids = conv.special_token_ids(tokenizer, expect_glamm_ids=False)
    if ids.im_start != base or ids.p_end != base + len(conv.SPECIAL_TOKENS) - 1:
        raise RuntimeError(f"special tokens did not land right after the base vocabulary ({base}): {ids}")
    return finalize_tokenizer(tokenizer)


# --- loading ------------------------------------------------------------------------------
def load_tokenizer(path: str | os.PathLike) -> PreTrainedTokenizerBase:
    """Tokenizer of a checkpoint directory: ours (`tokenizer.json`) or GLaMM/LEGION's SentencePiece
    `tokenizer.model` + `added_tokens.json` (converted to the tokenizers backend by transformers).

    Always right padding with pad = unk; special-token ids are checked by the caller via
    `conversation.special_token_ids` (GLaMM's 32000..32006 whenever the base vocabulary is 32000).
    """
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"tokenizer directory not found: {path}")
    has_fast, has_sp = (path / "tokenizer.json").is_file(), (path / "tokenizer.model").is_file()
    if not (has_fast or has_sp):
        raise FileNotFoundError(f"no tokenizer.json or tokenizer.model in {path}")
    tokenizer_class = _tokenizer_class(path)
    if tokenizer_class in (None, "LlamaTokenizer", "LlamaTokenizerFast"):
        # LLaMA family (ours and GLaMM's): no need to consult config.json (model_type llava/legion)
        tokenizer = LlamaTokenizer.from_pretrained(str(path), local_files_only=True)
    else:
        tokenizer = AutoTokenizer.from_pretrained(str(path), trust_remote_code=False, local_files_only=True)
    added = path / "added_tokens.json"
    if added.is_file():
        _check_added_tokens(tokenizer, json.loads(added.read_text()), added)
    return finalize_tokenizer(tokenizer)


def _tokenizer_class(path: Path) -> str | None:
    config_file = path / "tokenizer_config.json"
    if not config_file.is_file():
        return None
    return json.loads(config_file.read_text()).get("tokenizer_class")


def _check_added_tokens(tokenizer, expected: dict[str, int], source: Path) -> None:
    """The ids of `added_tokens.json` are part of the checkpoint: the embedding rows depend on them."""
    wrong = {tok: (idx, tokenizer.convert_tokens_to_ids(tok)) for tok, idx in expected.items()
             if tokenizer.convert_tokens_to_ids(tok) != idx}
    if wrong:
        details = ", ".join(f"{tok!r}: file {a} vs tokenizer {b}" for tok, (a, b) in wrong.items())
        raise ValueError(f"{source}: added-token ids not honoured by the loaded tokenizer ({details})")
