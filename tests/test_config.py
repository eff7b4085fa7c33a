from dataclasses import dataclass, field

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
