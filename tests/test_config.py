import json
from dataclasses import dataclass, field
from typing import ClassVar

import pytest

from legion.config import ConfigError, load_config, save_resolved_config


@dataclass
class Optim:
    lr: float = 1e-4
    betas: list = field(default_factory=lambda: [0.9, 0.95])


@dataclass
class Schema:
    name: str = "run"
    epochs: int = 3
    optim: Optim = field(default_factory=Optim)


def test_yaml_and_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("epochs: 5\noptim:\n  lr: 0.001\n")
    cfg = load_config(Schema, path, ["optim.lr=3e-4", "name=x"])
    assert cfg.epochs == 5 and cfg.optim.lr == pytest.approx(3e-4) and cfg.name == "x"
    assert isinstance(cfg, Schema) and isinstance(cfg.optim, Optim)


def test_unknown_key_names_closest(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("optim:\n  lrr: 0.1\n")
    with pytest.raises(ConfigError, match=r"optim\.lrr.*optim\.lr"):
        load_config(Schema, path)
    with pytest.raises(ConfigError, match=r"epoch.*epochs"):
        load_config(Schema, None, ["epoch=3"])


def test_type_error_is_config_error():
    with pytest.raises(ConfigError):
        load_config(Schema, None, ["epochs=many"])


def test_resolved_config_round_trip(tmp_path):
    cfg = load_config(Schema, None, ["epochs=7"])
    out = save_resolved_config(cfg, tmp_path)
    again = load_config(Schema, out)
    assert again == cfg


# --- deprecated (renamed) keys ---------------------------------------------------------------


@dataclass
class Model:
    dtype: str = "bfloat16"
    path: str = ""
    RENAMED: ClassVar[dict] = {"checkpoint": ("path", None)}  # declared on a nested section


@dataclass
class Renamed:
    output_dir: str = "runs/x"
    model: Model = field(default_factory=Model)
    RENAMED: ClassVar[dict] = {
        "out_dir": ("output_dir", None),
        "model.precision": ("model.dtype", {"bf16": "bfloat16", "fp32": "float32"}),
    }


DEPRECATED = "config key '{}' is deprecated: use '{}' (accepted until the next release)"


def test_old_key_in_yaml_gives_new_value_and_a_message(tmp_path, capsys):
    path = tmp_path / "c.yaml"
    path.write_text("out_dir: runs/old\nmodel:\n  precision: fp32\n  checkpoint: ck\n")
    cfg = load_config(Renamed, path)
    assert cfg.output_dir == "runs/old" and cfg.model.dtype == "float32" and cfg.model.path == "ck"
    err = capsys.readouterr().err.splitlines()
    assert f"{path}: " + DEPRECATED.format("model.precision", "model.dtype") in err
    assert f"{path}: " + DEPRECATED.format("out_dir", "output_dir") in err
    assert f"{path}: " + DEPRECATED.format("model.checkpoint", "model.path") in err
    assert len(err) == 3


def test_old_key_on_the_command_line_gives_new_value_and_a_message(tmp_path, capsys):
    path = tmp_path / "c.yaml"
    path.write_text("output_dir: runs/file\nmodel:\n  dtype: bfloat16\n")
    cfg = load_config(Renamed, path, ["model.precision=fp32", "out_dir=runs/cli"])
    assert cfg.model.dtype == "float32" and cfg.output_dir == "runs/cli"  # the command line wins, as always
    err = capsys.readouterr().err
    assert "override: " + DEPRECATED.format("model.precision", "model.dtype") in err
    assert "override: " + DEPRECATED.format("out_dir", "output_dir") in err
    # a value outside the map passes through (the schema's own checks judge it)
    assert load_config(Renamed, None, ["model.precision=float16"]).model.dtype == "float16"


def test_old_and_new_key_together_is_an_error(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("model:\n  precision: bf16\n  dtype: float32\n")
    with pytest.raises(ConfigError, match=r"both 'model\.precision' \(deprecated\) and 'model\.dtype'"):
        load_config(Renamed, path)
    with pytest.raises(ConfigError, match=r"both 'out_dir' \(deprecated\) and 'output_dir'"):
        load_config(Renamed, None, ["out_dir=a", "output_dir=b"])


def test_unknown_keys_still_fail_with_a_suggestion_next_to_renames(tmp_path, capsys):
    path = tmp_path / "c.yaml"
    path.write_text("output_dirr: x\n")
    with pytest.raises(ConfigError, match=r"unknown config key 'output_dirr' \(did you mean 'output_dir'\?\)"):
        load_config(Renamed, path)
    with pytest.raises(ConfigError, match=r"unknown config key 'model\.dtyp' \(did you mean 'model\.dtype'\?\)"):
        load_config(Renamed, None, ["model.dtyp=float32"])
    assert capsys.readouterr().err == ""


def test_renamed_keys_are_listed_in_help():
    import argparse

    from legion.config import add_config_arguments, renamed_keys

    assert renamed_keys(Renamed) == {
        "out_dir": ("output_dir", None),
        "model.precision": ("model.dtype", {"bf16": "bfloat16", "fp32": "float32"}),
        "model.checkpoint": ("model.path", None),
    }
    parser = argparse.ArgumentParser()
    add_config_arguments(parser, Renamed, "YAML", "a=b")
    assert "model.precision -> model.dtype" in parser.epilog and "RENAMED" not in parser.epilog


@pytest.mark.parametrize(
    "schema_path, old, new, value, expected",
    [
        ("legion.eval.detector_run:DetectorEvalConfig", "detector", "detector_path", "runs/d", "runs/d"),
        ("legion.eval.detector_run:DetectorEvalConfig", "backbone", "detector_backbone", "ck/clip", "ck/clip"),
        ("legion.train.loc_exp:TrainConfig", "model.precision", "model.dtype", "bf16", "bfloat16"),
        ("legion.train.loc_exp:TrainConfig", "model.precision", "model.dtype", "fp32", "float32"),
        ("legion.controller.regenerate:RegenerateConfig", "out_dir", "output_dir", "runs/r", "runs/r"),
        ("legion.controller.inpaint:InpaintConfig", "out_dir", "output_dir", "runs/i", "runs/i"),
    ],
)
def test_declared_renames_of_the_recipes(schema_path, old, new, value, expected, tmp_path, capsys):
    import importlib

    from omegaconf import OmegaConf

    module, name = schema_path.split(":")
    schema = getattr(importlib.import_module(module), name)
    cfg = load_config(schema, None, [f"{old}={value}"])
    assert OmegaConf.select(OmegaConf.structured(cfg), new) == expected
    assert DEPRECATED.format(old, new) in capsys.readouterr().err
    *parents, leaf = old.split(".")
    data: dict = {leaf: value}
    for part in reversed(parents):
        data = {part: data}
    path = tmp_path / "old.yaml"
    path.write_text(json.dumps(data))  # JSON is YAML
    assert OmegaConf.select(OmegaConf.structured(load_config(schema, path)), new) == expected
    assert DEPRECATED.format(old, new) in capsys.readouterr().err
