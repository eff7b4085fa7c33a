"""The LLaMA tokenizer exactly as LEGION's weights were trained with it, and a tiny one like it.

LEGION (and GLaMM before it) trained with transformers 4.28 and its slow SentencePiece
`LlamaTokenizer`. How that tokenizer treats whitespace next to the added tokens (`<p>`, `</p>`,
`[SEG]`, `<im_start>` ...) decides which ids the model saw, and so which hidden state feeds SAM.
Its rule (docs/tokenization.md has the measured examples):

1. split the text on every added or special token (`<s>`, `</s>`, `<unk>` included), leftmost and
   longest first;
2. strip all whitespace (Python's `str.isspace`) directly left and right of each such token;
3. encode every remaining non-empty piece with SentencePiece on its own, so each piece gets
   SentencePiece's dummy-prefix `▁`; drop pieces that became empty.

transformers 5 has no slow tokenizers: its tokenizers-backed `LlamaTokenizer` keeps those spaces
(a lone `▁` before `<p>`, `</p>`, `[SEG]` and `<im_start>`). `LegionTokenizer` re-implements the
4.28 behaviour on the `sentencepiece` library, and is tested against ids produced by the real 4.28
stack (tests/golden/). Both the released checkpoints (SentencePiece `tokenizer.model` +
`added_tokens.json`) and our tiny checkpoints (a SentencePiece model trained offline, same layout)
go through it, so tiny runs exercise the real path.

Directories that only hold a `tokenizer.json` (written by versions of this project before the
change) still load, through transformers and with the old whitespace rule they were trained with,
and a warning.
"""

from __future__ import annotations

import io
import json
import logging
import os
import re
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import sentencepiece as spm

from legion.errors import DataError, MissingFileError
from legion.model import conversation as conv
from legion.utils.io import atomic_write_bytes

log = logging.getLogger(__name__)

UNK, BOS, EOS = "<unk>", "<s>", "</s>"
TINY_VOCAB_SIZE = 3072  # upper bound of the tiny SentencePiece vocabulary (small corpora stop earlier)
TINY_MODEL_MAX_LENGTH = 1536  # as in LEGION training


@dataclass
class Encoding:
    """What `tokenizer(text)` returns; `.input_ids` as with a transformers tokenizer."""

    input_ids: list[int]


class LegionTokenizer:
    """SentencePiece LLaMA tokenizer + added tokens, tokenizing and decoding as transformers 4.28's
    slow `LlamaTokenizer` did (the module docstring gives the rule).

    Args:
        model_proto: the serialized SentencePiece model (`tokenizer.model`).
        added_tokens: token -> id, ids continuing the SentencePiece vocabulary (`added_tokens.json`).
        add_bos_token: prepend `<s>` when `add_special_tokens=True` (LLaMA).
        clean_up_tokenization_spaces: 4.28's `decode` clean-up (" ." -> "." ...); a checkpoint's
            `tokenizer_config.json` decides, and 4.28 defaulted to True when the key was absent.
    """

    unk_token, bos_token, eos_token = UNK, BOS, EOS
    padding_side = "right"

    def __init__(
        self,
        model_proto: bytes,
        added_tokens: dict[str, int] | None = None,
        *,
        add_bos_token: bool = True,
        clean_up_tokenization_spaces: bool = True,
        model_max_length: int = TINY_MODEL_MAX_LENGTH,
        name_or_path: str = "",
    ):
        self.model_proto = bytes(model_proto)
        self.sp = spm.SentencePieceProcessor(model_proto=self.model_proto)
        self.add_bos_token = add_bos_token
        self.clean_up_tokenization_spaces = clean_up_tokenization_spaces
        self.model_max_length = model_max_length
        self.name_or_path = name_or_path
        self.unk_token_id, self.bos_token_id, self.eos_token_id = (self.sp.piece_to_id(t) for t in (UNK, BOS, EOS))
        self.pad_token, self.pad_token_id = UNK, self.unk_token_id  # pad = unk (id 0), as LEGION trains
        self.added_tokens_encoder: dict[str, int] = {}
        self.added_tokens_decoder: dict[int, str] = {}
        self._split_re: re.Pattern | None = None
        for token, index in sorted((added_tokens or {}).items(), key=lambda kv: kv[1]):
            if index != len(self):  # 4.28 required the same: added ids continue the vocabulary
                raise DataError(
                    f"added token {token!r} has id {index}, expected {len(self)} (ids must continue "
                    f"the {self.sp.get_piece_size()}-piece SentencePiece vocabulary without gaps)"
                )
            self._add(token)
        self._rebuild_split_pattern()

    # --- vocabulary ---------------------------------------------------------------------------
    def __len__(self) -> int:
        return self.sp.get_piece_size() + len(self.added_tokens_encoder)

    @property
    def all_special_ids(self) -> list[int]:
        return [self.bos_token_id, self.eos_token_id, self.unk_token_id]

    def _add(self, token: str) -> None:
        index = len(self)
        self.added_tokens_encoder[token] = index
        self.added_tokens_decoder[index] = token

    def add_tokens(self, tokens: Sequence[str], special_tokens: bool = True) -> int:
        """Append tokens not yet known (GLaMM's `add_tokens`); returns how many were added."""
        new = [t for t in tokens if t not in self.added_tokens_encoder and self.sp.piece_to_id(t) == self.unk_token_id]
        for token in new:
            self._add(token)
        self._rebuild_split_pattern()
        return len(new)

    def _rebuild_split_pattern(self) -> None:
        no_split = sorted({UNK, BOS, EOS, *self.added_tokens_encoder}, key=len, reverse=True)
        self._split_re = re.compile("(" + "|".join(re.escape(t) for t in no_split) + ")")
        self._no_split = set(no_split)

    def get_vocab(self) -> dict[str, int]:
        vocab = {self.sp.id_to_piece(i): i for i in range(self.sp.get_piece_size())}
        vocab.update(self.added_tokens_encoder)
        return vocab

    def convert_tokens_to_ids(self, tokens: str | Sequence[str]) -> int | list[int]:
        if isinstance(tokens, str):
            if tokens in self.added_tokens_encoder:
                return self.added_tokens_encoder[tokens]
            return self.sp.piece_to_id(tokens)
        return [self.convert_tokens_to_ids(t) for t in tokens]

    def convert_ids_to_tokens(self, ids: int | Sequence[int]) -> str | list[str]:
        if isinstance(ids, int):
            return self.added_tokens_decoder.get(ids) or self.sp.id_to_piece(ids)
        return [self.convert_ids_to_tokens(int(i)) for i in ids]

    # --- encoding -----------------------------------------------------------------------------
    def split_on_tokens(self, text: str) -> list[str]:
        """The text cut around added/special tokens, whitespace next to them stripped, empties dropped."""
        parts = self._split_re.split(text)
        for i, part in enumerate(parts):
            if part in self._no_split:
                if i > 0:
                    parts[i - 1] = parts[i - 1].rstrip()
                if i + 1 < len(parts):
                    parts[i + 1] = parts[i + 1].lstrip()
        return [p for p in parts if p]

    def tokenize(self, text: str) -> list[str]:
        return self.convert_ids_to_tokens(self.encode(text, add_special_tokens=False))

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        ids = [self.bos_token_id] if add_special_tokens and self.add_bos_token else []
        for part in self.split_on_tokens(text):
            if part in self._no_split:
                ids.append(self.convert_tokens_to_ids(part))
            else:
                ids.extend(self.sp.encode(part))
        return ids

    def __call__(self, text: str, add_special_tokens: bool = True) -> Encoding:
        return Encoding(self.encode(text, add_special_tokens))

    # --- decoding (4.28's `_decode` + LLaMA's `convert_tokens_to_string`) ------------------------
    def decode(
        self, ids: Iterable[int], skip_special_tokens: bool = False, clean_up_tokenization_spaces: bool | None = None
    ) -> str:
        """Text of `ids`: the runs between added tokens are decoded by SentencePiece, and the pieces
        are joined with one space (4.28's `spaces_between_special_tokens`)."""
        ids = [int(i) for i in ids]
        special = set(self.all_special_ids)
        pieces, run = [], []
        for index in ids:
            if skip_special_tokens and index in special:
                continue
            if index in self.added_tokens_decoder:
                if run:
                    pieces.append(self._decode_run(run))
                    run = []
                pieces.append(self.added_tokens_decoder[index])
            else:
                run.append(index)
        if run:
            pieces.append(self._decode_run(run))
        text = " ".join(pieces)
        if self.clean_up_tokenization_spaces if clean_up_tokenization_spaces is None else clean_up_tokenization_spaces:
            text = clean_up_tokenization(text)
        return text

    def _decode_run(self, ids: list[int]) -> str:
        # `<s>`, `</s>`, `<unk>` are written as themselves, with a space before the first of a series
        special = set(self.all_special_ids)
        out, pending, previous_special = "", [], False
        for position, index in enumerate(ids):
            if index in special:
                if not previous_special and position != 0:
                    out += " "
                out += self.sp.decode(pending) + self.sp.id_to_piece(index)
                pending, previous_special = [], True
            else:
                pending.append(index)
                previous_special = False
        return out + self.sp.decode(pending)

    def batch_decode(self, sequences: Iterable[Iterable[int]], **kwargs) -> list[str]:
        return [self.decode(ids, **kwargs) for ids in sequences]

    # --- files --------------------------------------------------------------------------------
    def save_pretrained(self, out_dir: str | os.PathLike) -> list[Path]:
        """GLaMM's layout: tokenizer.model, added_tokens.json, special_tokens_map.json, tokenizer_config.json."""
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        contents = {
            "tokenizer.model": self.model_proto,
            "added_tokens.json": json.dumps(self.added_tokens_encoder, indent=2) + "\n",
            "special_tokens_map.json": json.dumps(
                {"bos_token": BOS, "eos_token": EOS, "unk_token": UNK, "pad_token": UNK}, indent=2
            )
            + "\n",
            "tokenizer_config.json": json.dumps(
                {
                    "tokenizer_class": "LlamaTokenizer",
                    "add_bos_token": self.add_bos_token,
                    "add_eos_token": False,
                    "bos_token": BOS,
                    "eos_token": EOS,
                    "unk_token": UNK,
                    "pad_token": UNK,
                    "clean_up_tokenization_spaces": self.clean_up_tokenization_spaces,
                    "model_max_length": self.model_max_length,
                    "padding_side": "right",
                },
                indent=2,
            )
            + "\n",
        }
        written = []
        for name, data in contents.items():
            path = out_dir / name
            atomic_write_bytes(path, data if isinstance(data, bytes) else data.encode("utf-8"))
            written.append(path)
        return written

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike) -> LegionTokenizer:
        path = Path(path)
        config = _read_json(path / "tokenizer_config.json")
        added = _read_json(path / "added_tokens.json")
        max_length = config.get("model_max_length")
        return cls(
            (path / "tokenizer.model").read_bytes(),
            added,
            add_bos_token=config.get("add_bos_token", True) is not False,
            clean_up_tokenization_spaces=bool(config.get("clean_up_tokenization_spaces", True)),
            model_max_length=int(max_length)
            if isinstance(max_length, int) and max_length < 10**9
            else TINY_MODEL_MAX_LENGTH,
            name_or_path=str(path),
        )

    def __repr__(self) -> str:
        return (
            f"LegionTokenizer(pieces={self.sp.get_piece_size()}, added={len(self.added_tokens_encoder)}, "
            f"name_or_path={self.name_or_path!r})"
        )


def clean_up_tokenization(text: str) -> str:
    """transformers 4.28's `clean_up_tokenization` (spaces before punctuation and English contractions)."""
    for before, after in (
        (" .", "."),
        (" ?", "?"),
        (" !", "!"),
        (" ,", ","),
        (" ' ", "'"),
        (" n't", "n't"),
        (" 'm", "'m"),
        (" 's", "'s"),
        (" 've", "'ve"),
        (" 're", "'re"),
    ):
        text = text.replace(before, after)
    return text


def _read_json(path: Path) -> dict:
    if not path.is_file():
        return {}
    data = json.loads(path.read_text(encoding="utf-8"))
    if not isinstance(data, dict):
        raise DataError(f"{path}: expected a JSON object")
    return data


# --- tiny tokenizer -----------------------------------------------------------------------
def prompt_corpus() -> list[str]:
    """LEGION's own texts (system prompt, questions, a tagged answer): part of every tiny vocabulary.

    `legion.model.builders.tiny_tokenizer_corpus()` adds the ToyScars captions for `make-tiny`.
    """
    answer = f"{conv.tag_phrase('the hand')}: the fingers are fused."
    return [
        conv.render_conversation(answer),
        conv.render_prompt(),
        conv.SYSTEM,
        conv.GCG_QUESTION,
        "Could you provide a detailed analysis of artifacts in this photo? Please output with interleaved "
        "segmentation masks for the corresponding parts of the answer.",
    ]


def _training_lines(texts: Iterable[str]) -> Iterator[str]:
    # Added tokens never reach SentencePiece (they are split off first): keep them out of its statistics.
    pattern = re.compile("|".join(re.escape(t) for t in [*conv.SPECIAL_TOKENS, conv.IMAGE_PLACEHOLDER, EOS, BOS]))
    for text in texts:
        for line in pattern.sub(" ", text).split("\n"):
            if line.strip():
                yield line


def train_sentencepiece(corpus: Iterable[str], vocab_size: int = TINY_VOCAB_SIZE) -> bytes:
    """A SentencePiece BPE model with LLaMA's trainer settings (byte fallback, split digits, whitespace
    kept, `<unk>`/`<s>`/`</s>` = 0/1/2), trained in-process. Deterministic for a given corpus."""
    buffer = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=_training_lines(corpus),
        model_writer=buffer,
        vocab_size=vocab_size,
        model_type="bpe",
        byte_fallback=True,
        split_digits=True,
        allow_whitespace_only_pieces=True,
        add_dummy_prefix=True,
        remove_extra_whitespaces=False,
        normalization_rule_name="identity",
        character_coverage=1.0,
        max_sentencepiece_length=16,
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=-1,
        hard_vocab_limit=False,
        num_threads=1,
        shuffle_input_sentence=False,
        minloglevel=2,
    )
    return buffer.getvalue()


def build_tiny_tokenizer(corpus: list[str], vocab_size: int = TINY_VOCAB_SIZE) -> LegionTokenizer:
    """A small LLaMA-like SentencePiece tokenizer trained offline on `corpus`, with LEGION's tokens
    appended in GLaMM's order right after the base vocabulary. `len(tokenizer)` is the model's
    vocabulary size. Deterministic: the same corpus gives the same tokenizer on every machine."""
    model = train_sentencepiece(corpus, vocab_size)
    tokenizer = LegionTokenizer(model, clean_up_tokenization_spaces=False, model_max_length=TINY_MODEL_MAX_LENGTH)
    base = len(tokenizer)
    conv.add_special_tokens(tokenizer)
    ids = conv.special_token_ids(tokenizer, expect_glamm_ids=False)
    if ids.im_start != base or ids.p_end != base + len(conv.SPECIAL_TOKENS) - 1:
        raise RuntimeError(f"special tokens did not land right after the base vocabulary ({base}): {ids}")
    return tokenizer


# --- loading ------------------------------------------------------------------------------
def load_tokenizer(path: str | os.PathLike):
    """Tokenizer of a checkpoint directory.

    `tokenizer.model` (+ `added_tokens.json`): a `LegionTokenizer`, the reference behaviour (released
    GLaMM/LEGION checkpoints and everything this project writes now). Only `tokenizer.json`: a
    directory written before the change, loaded through transformers with the whitespace rule it was
    trained with (a warning says so). Special-token ids are checked by the caller via
    `conversation.special_token_ids` (GLaMM's 32000..32006 whenever the base vocabulary is 32000).
    """
    path = Path(path)
    if not path.is_dir():
        raise MissingFileError(f"tokenizer directory not found: {path}")
    if (path / "tokenizer.model").is_file():
        return LegionTokenizer.from_pretrained(path)
    if (path / "tokenizer.json").is_file():
        return _load_legacy_tokenizers_json(path)
    raise MissingFileError(f"no tokenizer.model (or legacy tokenizer.json) in {path}")


def _load_legacy_tokenizers_json(path: Path):
    from transformers import LlamaTokenizer

    log.warning(
        "%s has only tokenizer.json: a tokenizer written before LEGION's reference tokenization was "
        "adopted. It is loaded with the whitespace rule it was trained with, which differs from the "
        "released weights' (docs/tokenization.md); re-create it (`legion make-tiny`) for new runs.",
        path,
    )
    tokenizer = LlamaTokenizer.from_pretrained(str(path), local_files_only=True)
    tokenizer.padding_side = "right"
    if tokenizer.bos_token_id is not None and tokenizer("a").input_ids[:1] != [tokenizer.bos_token_id]:
        tokenizer.add_bos_token = True
        tokenizer.update_post_processor()
    tokenizer.pad_token = tokenizer.unk_token
    added = path / "added_tokens.json"
    if added.is_file():
        expected = json.loads(added.read_text())
        wrong = {t: i for t, i in expected.items() if tokenizer.convert_tokens_to_ids(t) != i}
        if wrong:
            raise DataError(f"{added}: added-token ids not honoured by the loaded tokenizer: {wrong}")
    return tokenizer
