"""The prediction record: what LEGION says about one image, as one line of `predictions.jsonl`.

Written by `legion infer` (and the Python API), read back by evaluation, the controller and the
report gallery. The fields are defined here once; docs point at this class.

| field | meaning |
|---|---|
| `image` | path relative to the inference `image_dir` (or as written in `image_list`); None in memory |
| `width`, `height` | original image size (None when the image could not be read) |
| `verdict` | `"fake"` (analysed), `"real"` (gated by the detector: no analysis) or `"error"` |
| `fake_prob` | the detector's P(fake); None without a detector |
| `explanation` | the answer cleaned as the reference cleans it (`conversation.parse_answer`) |
| `phrases` | the grounded phrases, in order |
| `masks` | one COCO RLE `{"size": [h, w], "counts": str}` per `[SEG]`, in order |
| `union_mask` | RLE of their union (all zero for `real` and when there is no `[SEG]`; None on error) |
| `no_seg` | true when the answer has no `[SEG]`: `masks` is empty, never an unexplained black mask |
| `raw_text` | the decoded answer, special tokens kept |
| `sam_input_size` | SAM's ResizeLongestSide S used |
| `seconds` | wall time of the image's batch / batch size (loader workers' reading + preprocessing not included) |
| `error` | None, or why the image has no analysis (unreadable, failure during generation) |
| `num_seg` | number of `[SEG]` tokens generated |
| `mismatch` | None, or `"2 phrases, 1 [SEG], 1 masks"` when the three counts differ (pairing is by order) |
| `truncated` | true when `max_new_tokens` stopped the answer |
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from typing import Any

VERDICTS = ("fake", "real", "error")


@dataclass
class PredictionRecord:
    """One image's prediction (see the module docstring for every field)."""

    image: str | None = None
    width: int | None = None
    height: int | None = None
    verdict: str | None = None
    fake_prob: float | None = None
    explanation: str = ""
    phrases: list[str] = field(default_factory=list)
    masks: list[dict] = field(default_factory=list)
    union_mask: dict | None = None
    no_seg: bool = False
    raw_text: str | None = None
    sam_input_size: int | None = None
    seconds: float | None = None
    error: str | None = None
    num_seg: int = 0
    mismatch: str | None = None
    truncated: bool = False

    @classmethod
    def failed(
        cls, message: str, width: int | None = None, height: int | None = None, sam_input_size: int | None = None
    ) -> PredictionRecord:
        """The record of an image that could not be analysed."""
        return cls(width=width, height=height, verdict="error", error=message, sam_input_size=sam_input_size)

    def to_json(self) -> dict[str, Any]:
        """The predictions.jsonl object: every field, `image` first (dropped while it is None)."""
        data = asdict(self)
        if data["image"] is None:
            del data["image"]
        return data

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> PredictionRecord:
        """A record from a predictions.jsonl object. Records written by older versions or by other tools may
        lack fields (they get their defaults); unknown fields are ignored. Raises ValueError on a wrong type
        for the fields everything relies on."""
        if not isinstance(data, dict):
            raise ValueError(f"a prediction record is a JSON object, got {type(data).__name__}")
        known = {f.name for f in fields(cls)}
        record = cls(**{k: v for k, v in data.items() if k in known})
        if record.verdict is not None and record.verdict not in VERDICTS:
            raise ValueError(f"record {record.image!r}: verdict {record.verdict!r} is not one of {', '.join(VERDICTS)}")
        if not isinstance(record.masks, list) or not isinstance(record.phrases, list):
            raise ValueError(f"record {record.image!r}: masks and phrases must be lists")
        return record


RECORD_FIELDS = tuple(f.name for f in fields(PredictionRecord))
