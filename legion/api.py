"""The Python API: load LEGION once, analyse images, look at the answer.

    import legion
    analyzer = legion.load("checkpoints/legion_7b", detector="runs/detector")   # folder, checkpoints/<name> or Hub id
    result = analyzer.analyze("photo.jpg")          # also a PIL image, an RGB numpy array, or a list of them
    result.verdict, result.fake_prob, result.explanation, result.phrases
    result.masks[0]                                 # bool [H, W] per phrase, at the image's size
    result.union_mask                               # bool [H, W] (all False when there is nothing)
    result.overlay().save("overlay.png")            # the image with each phrase's mask in its colour
    result.to_json()                                # exactly the record `legion infer` writes (no "image" key)

`legion infer` and the controller run the same code: `Analyzer.from_config` loads, `Analyzer.analyze`
analyses; `Legion` only adds flexible inputs and decoded masks around it.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from legion.errors import OptionError
from legion.infer import Analyzer, AnalyzerConfig
from legion.record import PredictionRecord

ImageInput = Any  # str | os.PathLike | PIL.Image.Image | np.ndarray


def load(
    model: str | os.PathLike,
    detector: str | os.PathLike | None = None,
    device: str = "auto",
    dtype: str = "auto",
    **settings,
) -> Legion:
    """An analyzer for `model`: a model directory, `checkpoints/<name>`, or a Hugging Face Hub id (`org/name`;
    downloaded only when the HF environment allows it). `detector`: a real/fake detector directory, to gate
    real images (verdict "real", no analysis). Other keyword arguments are `legion.infer.AnalyzerConfig` keys
    (e.g. `max_new_tokens=256`, `sam_input_size=1024`, `dtype_policy="fp32_grounding"`, `quantization="8bit"`,
    `gate_threshold=0.5`, `vision_tower=CLIP_DIR`)."""
    from legion.model.export import resolve_model_source

    known = {f.name for f in dataclasses.fields(AnalyzerConfig)} - {"model_path", "detector_path", "device", "dtype"}
    unknown = sorted(set(settings) - known)
    if unknown:
        raise OptionError(f"legion.load: unknown setting(s) {unknown}; known: {', '.join(sorted(known))}")
    cfg = AnalyzerConfig(
        model_path=str(resolve_model_source(model)),
        detector_path=str(detector) if detector is not None else None,
        device=device,
        dtype=dtype,
        **settings,
    )
    return Legion(Analyzer.from_config(cfg))


class Legion:
    """A loaded LEGION model (and detector). `analyze` takes one image or a list; see the module docstring."""

    def __init__(self, analyzer: Analyzer, batch_size: int = 4):
        self.analyzer = analyzer
        self.batch_size = batch_size

    def analyze(self, images: ImageInput | Sequence[ImageInput]) -> Analysis | list[Analysis]:
        """One `Analysis` per image: a single result for a single image, a list for a list."""
        single = not isinstance(images, (list, tuple))
        arrays = [to_rgb_array(x) for x in ([images] if single else images)]
        results = []
        for start in range(0, len(arrays), self.batch_size):
            batch = arrays[start : start + self.batch_size]
            results += [Analysis(record, image) for record, image in zip(self.analyzer.analyze(batch), batch)]
        return results[0] if single else results

    __call__ = analyze


@dataclasses.dataclass
class Analysis:
    """What LEGION says about one image: the prediction record plus the image, with decoded masks."""

    record: PredictionRecord
    image: np.ndarray  # RGB uint8 [H, W, 3], as analysed

    @property
    def verdict(self) -> str:
        return self.record.verdict

    @property
    def fake_prob(self) -> float | None:
        return self.record.fake_prob

    @property
    def explanation(self) -> str:
        return self.record.explanation

    @property
    def phrases(self) -> list[str]:
        return list(self.record.phrases)

    @property
    def seconds(self) -> float | None:
        return self.record.seconds

    @property
    def error(self) -> str | None:
        return self.record.error

    @property
    def masks(self) -> list[np.ndarray]:
        """One bool [H, W] mask per phrase (per `[SEG]`), at the image's size."""
        from legion.utils.rle import rle_to_mask

        return [rle_to_mask(rle).astype(bool) for rle in self.record.masks]

    @property
    def union_mask(self) -> np.ndarray:
        """bool [H, W]: every flagged pixel; all False for "real", "error" or an answer without `[SEG]`."""
        from legion.utils.rle import rle_to_mask

        if self.record.union_mask is not None:
            return rle_to_mask(self.record.union_mask).astype(bool)
        return np.zeros(self.image.shape[:2], dtype=bool)

    def overlay(self, alpha: float = 0.5, labels: bool = True):
        """A PIL image of the input's size: each phrase's mask tinted in its own colour and, with `labels`,
        the phrase written in that colour at the mask's top-left corner."""
        from PIL import Image, ImageDraw

        from legion.infer import OVERLAY_COLORS, overlay_image

        masks = self.masks
        picture = Image.fromarray(overlay_image(self.image, masks, alpha))
        if labels and masks:
            draw = ImageDraw.Draw(picture)
            for i, (mask, phrase) in enumerate(zip(masks, self.record.phrases)):
                ys, xs = np.nonzero(mask)
                if len(xs):
                    color = tuple(int(c) for c in OVERLAY_COLORS[i % len(OVERLAY_COLORS)])
                    draw.text((int(xs.min()), int(ys.min())), phrase, fill=color)
        return picture

    def to_json(self) -> dict:
        """The predictions.jsonl record `legion infer` writes for this image (without its "image" key)."""
        return self.record.to_json()

    def __repr__(self) -> str:
        return (
            f"Analysis(verdict={self.verdict!r}, fake_prob={self.fake_prob}, phrases={self.phrases}, "
            f"size={self.image.shape[1]}x{self.image.shape[0]})"
        )


def to_rgb_array(image: ImageInput) -> np.ndarray:
    """RGB uint8 [H, W, 3] from a path (read as `legion infer` reads files), a PIL image or a numpy array
    (uint8 [H, W, 3] RGB, or [H, W] grey)."""
    from legion.data.images import read_image

    if isinstance(image, (str, os.PathLike)):
        return read_image(Path(image))
    if isinstance(image, np.ndarray):
        if image.dtype == np.uint8 and image.ndim == 2:
            return np.repeat(image[:, :, None], 3, axis=2)
        if image.dtype == np.uint8 and image.ndim == 3 and image.shape[2] == 3:
            return np.ascontiguousarray(image)
        raise OptionError(f"a numpy image must be uint8 [H, W, 3] RGB or [H, W] grey, got {image.dtype} {image.shape}")
    try:
        from PIL import Image
    except ImportError:  # pragma: no cover - Pillow is a dependency
        Image = None
    if Image is not None and isinstance(image, Image.Image):
        from legion.data.images import pil_to_rgb

        try:  # the pixels a file of this mode gives `legion infer`
            return np.require(pil_to_rgb(image)[0], requirements=["C", "W"])
        except ValueError as exc:
            raise OptionError(f"cannot analyse this PIL image: {exc}") from None
    raise OptionError(f"cannot analyse a {type(image).__name__}: give a path, a PIL image or a numpy array")
