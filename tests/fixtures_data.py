"""Data fixtures (ToyScars, SynthScars sample). Owned by the data work."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
# The real 119-record SynthScars annotation sample (from the reference release's history; no images).
SAMPLE_PATH = REPO / "tests" / "data" / "synthscars_annotation_sample.json"


@pytest.fixture(scope="session")
def synthscars_sample_path() -> Path:
    return SAMPLE_PATH


def make_data_tokenizer():
    """A tiny LLaMA-like tokenizer trained on LEGION's prompts, ToyScars captions and the sample's captions."""
    from legion.data.toy import caption_corpus
    from legion.model import conversation as conv
    from legion.model.tokenizer import build_tiny_tokenizer

    corpus = [conv.render_conversation("x"), conv.GCG_QUESTION, conv.SYSTEM, *caption_corpus()]
    corpus += [next(iter(entry.values()))["caption"] for entry in json.loads(SAMPLE_PATH.read_text())]
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
