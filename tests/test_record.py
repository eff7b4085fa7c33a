"""PredictionRecord: the one definition of a predictions.jsonl line, and Analyzer.from_config's early checks."""

import json

import pytest

from legion.config import ConfigError
from legion.errors import InputNotFoundError
from legion.infer import Analyzer, AnalyzerConfig, InferConfig
from legion.record import RECORD_FIELDS, PredictionRecord


def test_json_round_trip_keeps_every_field_in_order():
    record = PredictionRecord(
        image="a/b.png",
        width=4,
        height=3,
        verdict="fake",
        fake_prob=0.9,
        explanation="the hand :fused",
        phrases=["the hand"],
        masks=[{"size": [3, 4], "counts": "0<"}],
        union_mask={"size": [3, 4], "counts": "0<"},
        raw_text="<p> the hand </p> [SEG] :fused</s>",
        sam_input_size=1024,
        seconds=0.5,
        num_seg=1,
    )
    data = record.to_json()
    assert list(data) == list(RECORD_FIELDS) and data["image"] == "a/b.png"
    assert PredictionRecord.from_json(json.loads(json.dumps(data))) == record
    # in memory (Analyzer.analyze) the image is not known: the key is left out, not written as null
    assert "image" not in PredictionRecord(verdict="real").to_json()


def test_older_or_foreign_records_load_with_defaults():
    record = PredictionRecord.from_json({"image": "x.png", "verdict": "fake", "union_mask": None, "extra": 1})
    assert record.masks == [] and record.phrases == [] and record.explanation == "" and not record.no_seg
    assert PredictionRecord.failed("unreadable", 5, 6).to_json()["error"] == "unreadable"


@pytest.mark.parametrize(
    "bad, message",
    [
        ({"image": "x", "verdict": '<img src=x onerror="alert(1)">'}, "verdict"),
        ({"image": "x", "masks": "not a list"}, "lists"),
        (["not", "an", "object"], "JSON object"),
    ],
)
def test_malformed_records_are_refused(bad, message):
    with pytest.raises(ValueError, match=message):
        PredictionRecord.from_json(bad)


def test_infer_config_is_the_analyzer_config_plus_run_keys():
    analyzer_keys = set(AnalyzerConfig.__dataclass_fields__)
    assert analyzer_keys < set(InferConfig.__dataclass_fields__)
    assert {"model_path", "device", "dtype", "dtype_policy", "decoding", "detector_path"} <= analyzer_keys
    assert not {"image_dir", "output_dir", "batch_size"} & analyzer_keys


@pytest.mark.parametrize(
    "override, error, message",
    [
        ({"dtype_policy": "mixed"}, ConfigError, "dtype_policy"),
        ({"decoding": "graph"}, ConfigError, "decoding"),
        ({"quantization": "3bit"}, ConfigError, "8bit, 4bit"),
        ({"max_new_tokens": -5}, ConfigError, "max_new_tokens"),
        ({"gate_threshold": 1.5}, ConfigError, "gate_threshold"),
        ({"model_path": "does/not/exist"}, InputNotFoundError, "model_path"),
    ],
)
def test_from_config_checks_settings_before_loading(tmp_path, override, error, message):
    """Nothing is loaded (the model folder is empty): every mistake is reported first."""
    cfg = AnalyzerConfig(**{"model_path": str(tmp_path), "device": "cpu", **override})
    with pytest.raises(error, match=message):
        Analyzer.from_config(cfg)
