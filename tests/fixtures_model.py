"""Model fixtures (tiny checkpoints) and helpers that write GLaMM-style files. Owned by the builders work.

- `tiny_model_dir` (session): a directory written by `legion.model.builders.make_tiny` (seed 0).
- `tiny_model` (function): `(model, tokenizer)` loaded from it, eval mode, fp32.
- `write_glamm_sentencepiece_tokenizer(dir)`: a GLaMM-like tokenizer directory (SentencePiece
  `tokenizer.model` padded to 32000 pieces + `added_tokens.json` with ids 32000..32006), trained
  offline on a fixed corpus.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest

from legion.model import conversation as conv

GLAMM_BASE_VOCAB = 32000

# Fixed corpus: the SentencePiece model (and so the golden ids in test_tokenizer.py) depends on it.
SP_CORPUS = [
    conv.render_conversation(
        f"Upon examining the image. I have found: {conv.tag_phrase('the hand')}: the "
        "fingers of the hand are fused together."
    ),
    conv.SYSTEM,
    conv.GCG_QUESTION,
    "The shadow of the tree falls in the wrong direction compared with the light source.",
    "The text on the sign is distorted and unreadable, and the left eye is larger than the right eye.",
    "A man in a hooded down jacket stands outdoors, with his right ear angled incorrectly.",
    "The texture of the wall is blurry and the colour of the sky looks unnatural.",
]


def train_small_sentencepiece(vocab_size: int = 600) -> bytes:
    """A LLaMA-like SentencePiece BPE model (byte fallback, <unk>/<s>/</s> = 0/1/2) as serialized bytes."""
    import sentencepiece as spm

    buffer = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(SP_CORPUS * 20),
        model_writer=buffer,
        vocab_size=vocab_size,
        model_type="bpe",
        byte_fallback=True,
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=-1,
        add_dummy_prefix=True,
        split_digits=True,
        normalization_rule_name="identity",
        hard_vocab_limit=False,
        num_threads=1,
        minloglevel=2,
    )
    return buffer.getvalue()


def pad_sentencepiece(model_bytes: bytes, size: int = GLAMM_BASE_VOCAB) -> bytes:
    """Append never-produced (UNUSED) pieces so the base vocabulary has `size` ids, like LLaMA's 32000."""
    from sentencepiece import sentencepiece_model_pb2 as pb

    proto = pb.ModelProto()
    proto.ParseFromString(model_bytes)
    for idx in range(len(proto.pieces), size):
        piece = proto.pieces.add()
        piece.piece, piece.score, piece.type = f"<unused_{idx}>", 0.0, pb.ModelProto.SentencePiece.UNUSED
    return proto.SerializeToString()


def write_glamm_sentencepiece_tokenizer(out_dir: str | Path, base_vocab: int = GLAMM_BASE_VOCAB) -> Path:
    """Tokenizer files as a GLaMM/LEGION checkpoint ships them (transformers-4.28-era JSON layout)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "tokenizer.model").write_bytes(pad_sentencepiece(train_small_sentencepiece(), base_vocab))
    added = {tok: base_vocab + i for i, tok in enumerate(conv.SPECIAL_TOKENS)}
    (out_dir / "added_tokens.json").write_text(json.dumps(added))

    def added_token(content):
        return {
            "__type": "AddedToken",
            "content": content,
            "lstrip": False,
            "normalized": True,
            "rstrip": False,
            "single_word": False,
        }

    (out_dir / "special_tokens_map.json").write_text(
        json.dumps(
            {
                "bos_token": added_token("<s>"),
                "eos_token": added_token("</s>"),
                "pad_token": "<unk>",
                "unk_token": added_token("<unk>"),
            }
        )
    )
    (out_dir / "tokenizer_config.json").write_text(
        json.dumps(
            {
                "add_bos_token": True,
                "add_eos_token": False,
                "bos_token": added_token("<s>"),
                "clean_up_tokenization_spaces": False,
                "eos_token": added_token("</s>"),
                "legacy": False,
                "model_max_length": 1536,
                "pad_token": None,
                "padding_side": "right",
                "sp_model_kwargs": {},
                "tokenizer_class": "LlamaTokenizer",
                "unk_token": added_token("<unk>"),
            }
        )
    )
    return out_dir


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    from legion.model.builders import make_tiny

    return make_tiny(tmp_path_factory.mktemp("tiny_ckpt") / "tiny", seed=0)


@pytest.fixture()
def tiny_model(tiny_model_dir):
    import torch

    from legion.model.builders import load_model

    model, tokenizer, _report = load_model(tiny_model_dir, dtype=torch.float32, device="cpu", verbose=False)
    model.eval()
    return model, tokenizer
