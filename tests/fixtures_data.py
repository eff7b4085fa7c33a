"""Data fixtures (ToyScars, SynthScars sample). Owned by the data work."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
SAMPLE_CANDIDATES = (Path("/work/shared/data/synthscars_annotation_sample.json"),
                     REPO.parent / "shared" / "data" / "synthscars_annotation_sample.json")


@pytest.fixture(scope="session")
def synthscars_sample_path() -> Path:
    for path in SAMPLE_CANDIDATES:
        if path.is_file():
            return path
    pytest.skip("SynthScars annotation sample not found (../shared/data/synthscars_annotation_sample.json)")


def _fallback_tokenizer(corpus: list[str]):
    """A small BPE trained here when legion.model.tokenizer is unavailable (same conventions)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    from legion.model import conversation as conv

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")
    tok.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=2000, special_tokens=["<unk>", "<s>", "</s>"],
                                                        show_progress=False))
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>",
                                   pad_token="<unk>", padding_side="right")
    conv.add_special_tokens(fast)
    return fast


def make_data_tokenizer():
    from legion.model import conversation as conv

    corpus = [conv.render_conversation("x"), conv.GCG_QUESTION, conv.SYSTEM]
    try:
        from legion.data.toy import caption_corpus
        corpus += caption_corpus()
    except ImportError:
        pass
    for path in SAMPLE_CANDIDATES:
        if path.is_file():
            for entry in json.loads(path.read_text()):
                body = next(iter(entry.values()))
                corpus.append(body["caption"])
            break
    try:
        from legion.model.tokenizer import build_tiny_tokenizer
    except ImportError:
        return _fallback_tokenizer(corpus)
    return build_tiny_tokenizer(corpus)


@pytest.fixture(scope="session")
def data_tokenizer():
    """A tiny LLaMA-like tokenizer with LEGION's special tokens (trained offline, seconds)."""
    return make_data_tokenizer()


def record_canvas_size(body: dict) -> tuple[int, int]:
    """(H, W) implied by a record's largest polygon coordinates (images are not shipped)."""
    xs = [v for ref in body["refs"] for poly in ref["segmentation"] for v in poly[0::2]] or [63.0]
    ys = [v for ref in body["refs"] for poly in ref["segmentation"] for v in poly[1::2]] or [63.0]
    return math.ceil(max(ys)) + 1, math.ceil(max(xs)) + 1


def write_sample_root(sample_path: Path, root: Path, split: str = "train", annotation_dir: str = "annotations") -> Path:
    """SynthScars layout around the real annotation sample with flat placeholder images whose size is
    implied by each record's polygons (PNG/JPEG by the file's own extension)."""
    data = json.loads(Path(sample_path).read_text())
    (root / split / annotation_dir).mkdir(parents=True, exist_ok=True)
    (root / split / "images").mkdir(parents=True, exist_ok=True)
    (root / split / annotation_dir / f"{split}.json").write_text(json.dumps(data))
    sizes: dict[str, tuple[int, int]] = {}
    for entry in data:
        body = next(iter(entry.values()))
        name = body["img_file_name"].rsplit("/", 1)[-1]
        h, w = record_canvas_size(body)
        old = sizes.get(name, (0, 0))
        sizes[name] = (max(h, old[0]), max(w, old[1]))
    for name, (h, w) in sizes.items():
        colour = (37 * len(name) % 256, 90, 160)
        Image.new("RGB", (w, h), colour).save(root / split / "images" / name)
    return root


@pytest.fixture(scope="session")
def synthscars_sample_root(synthscars_sample_path, tmp_path_factory) -> Path:
    return write_sample_root(synthscars_sample_path, tmp_path_factory.mktemp("synthscars_sample"))


@pytest.fixture(scope="session")
def toy_data_dir(tmp_path_factory) -> Path:
    """A small ToyScars dataset (12 train / 6 test images, 64 px), built once per session."""
    from legion.data.toy import make_toy_data

    out = tmp_path_factory.mktemp("toyscars")
    make_toy_data(out, num_train=12, num_test=6, seed=0, size=64)
    return out
