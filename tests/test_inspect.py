"""`legion inspect`: per-module counts under the default training rule and the --keys listing."""

from __future__ import annotations

import re

import pytest

from legion.cli import main
from legion.model.inspect import build_meta_model, key_lines, parameter_table
from tests.test_builders import glamm_key_table

KEY_LINE = re.compile(r"^[A-Za-z0-9_.]+\t\[\d+(, \d+)*\]$")


def _parse(lines):
    out = {}
    for line in lines:
        assert KEY_LINE.match(line), repr(line)
        key, shape = line.split("\t")
        out[key] = [int(d) for d in shape.strip("[]").split(", ")]
    return out


@pytest.fixture(scope="module")
def meta_7b():
    return build_meta_model("legion_7b")


def test_keys_of_legion_7b_are_the_glamm_table(meta_7b):
    assert _parse(key_lines(meta_7b)) == glamm_key_table()


def test_default_training_rule_counts_for_legion_7b(meta_7b):
    rows = {name: (count, trainable, frozen) for name, count, trainable, frozen in parameter_table(meta_7b, 8)}
    # docs/model.md §0: 288,284,132 parameters receive gradients in the loc/exp stage
    assert rows["total"][1] == 288_284_132
    assert rows["LoRA r=8 (64 q_proj/v_proj)"] == (4_194_304, 4_194_304, 0)
    assert rows["model.grounding_encoder.mask_decoder"] == (4_058_340, 4_058_340, 0)
    assert rows["model.region_encoder"] == (299_142_912, 0, 299_142_912)
    assert rows["model.vision_tower"] == (303_507_456, 0, 303_507_456)
    assert rows["total"][0] == 8_021_023_792 + 4_194_304  # the paper's "8B" + LoRA factors
    assert "(other)" not in rows


def test_inspect_keys_of_a_checkpoint_dir_match_its_weights(tiny_model_dir, capsys):
    from safetensors import safe_open

    assert main(["inspect", str(tiny_model_dir), "--keys"]) == 0
    listed = _parse(capsys.readouterr().out.strip().splitlines())
    with safe_open(str(tiny_model_dir / "model.safetensors"), "pt") as fh:
        stored = {k: list(fh.get_slice(k).get_shape()) for k in fh.keys()}
    assert listed == stored


def test_inspect_table_output(tiny_model_dir, capsys):
    assert main(["inspect", str(tiny_model_dir)]) == 0
    out = capsys.readouterr().out
    assert "model.grounding_encoder.mask_decoder" in out and "trainable" in out and "64 image tokens" in out
    assert main(["inspect", "no_such_preset_or_dir"]) == 2
    assert "neither a preset" in capsys.readouterr().err


def test_inspect_stored_keys_equal_config_keys(tiny_model_dir, capsys):
    assert main(["inspect", str(tiny_model_dir), "--keys", "--stored"]) == 0
    stored = _parse(capsys.readouterr().out.strip().splitlines())
    assert main(["inspect", str(tiny_model_dir), "--keys"]) == 0
    assert stored == _parse(capsys.readouterr().out.strip().splitlines())
    assert main(["inspect", "tiny", "--stored"]) == 2
