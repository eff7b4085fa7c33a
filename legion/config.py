"""Typed configs: a dataclass schema + a YAML file + `key=value` overrides from the command line.

    cfg = load_config(TrainConfig, "configs/tiny/train_loc_exp.yaml", ["optim.lr=3e-4"])

Unknown or mistyped keys are errors that name the key and the closest valid one, so a typo in
a 3-day training config fails in the first second instead of being silently ignored.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any, TypeVar

import yaml
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from legion.errors import UsageError
from legion.utils.io import atomic_write_text

T = TypeVar("T")


class ConfigError(UsageError, ValueError):
    """A config file or override that does not match the schema (exit code 2)."""


def _closest(key: str, valid: Sequence[str]) -> str:
    match = difflib.get_close_matches(key, list(valid), n=1, cutoff=0.0)
    return f" (did you mean '{match[0]}'?)" if match else ""


def _check_keys(schema: DictConfig, given: Any, where: str, prefix: str = "") -> None:
    """Raise ConfigError for the first key in `given` that the schema does not have."""
    if not isinstance(given, (dict, DictConfig)):
        return
    for key, value in given.items():
        full = f"{prefix}{key}"
        if key not in schema:
            valid = [f"{prefix}{k}" for k in schema.keys()]
            raise ConfigError(f"{where}: unknown config key '{full}'{_closest(full, valid)}")
        sub = schema[key] if OmegaConf.is_dict(schema) else None
        if isinstance(sub, DictConfig) and not _is_free_dict(schema, key):
            _check_keys(sub, value, where, prefix=f"{full}.")


def _is_free_dict(schema: DictConfig, key: str) -> bool:
    """Dict[str, X] fields accept any key."""
    node = schema._get_node(key)
    return node is not None and node._metadata.object_type in (dict, None) and node._metadata.key_type is not None


def _parse_value(text: str) -> Any:
    if text == "":
        return ""
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def _all_keys(cfg: DictConfig, prefix: str = "") -> list[str]:
    keys = []
    for k in cfg.keys():
        v = cfg[k] if not OmegaConf.is_missing(cfg, k) else None
        keys.append(f"{prefix}{k}")
        if isinstance(v, DictConfig):
            keys.extend(_all_keys(v, f"{prefix}{k}."))
    return keys


def load_config(schema: type[T], path: str | os.PathLike | None = None, overrides: Sequence[str] = ()) -> T:
    """Build a `schema` dataclass instance from defaults <- YAML file <- `key=value` overrides."""
    base = OmegaConf.structured(schema)
    merged = base
    try:
        if path is not None:
            path = Path(path)
            if not path.is_file():
                raise ConfigError(f"config file not found: {path}")
            with open(path) as fh:
                try:
                    data = yaml.safe_load(fh) or {}
                except yaml.YAMLError as exc:
                    raise ConfigError(f"{path}: not valid YAML ({exc})") from None
            if not isinstance(data, dict):
                raise ConfigError(f"{path}: expected a mapping at the top level, got {type(data).__name__}")
            _check_keys(base, data, str(path))
            merged = OmegaConf.merge(merged, data)
        for item in overrides:
            if "=" not in item:
                raise ConfigError(f"override '{item}' is not of the form key=value")
            key, value = item.split("=", 1)
            key = key.strip().lstrip("-")
            parent, _, leaf = key.rpartition(".")
            node = OmegaConf.select(merged, parent) if parent else merged
            if not isinstance(node, DictConfig) or (leaf not in node and not _accepts_any_key(merged, parent)):
                raise ConfigError(f"override: unknown config key '{key}'{_closest(key, _all_keys(merged))}")
            parsed = _parse_value(value)
            # A free dict given whole (`optim.module_lr={a: 1}`) replaces the file's; other values merge.
            replace = isinstance(parsed, dict) and _accepts_any_key(merged, key)
            OmegaConf.update(merged, key, parsed, merge=not replace)
        return OmegaConf.to_object(merged)
    except OmegaConfBaseException as exc:  # type errors, missing values
        raise ConfigError(f"invalid config: {exc}".strip()) from None


def _accepts_any_key(cfg: DictConfig, parent: str) -> bool:
    if not parent:
        return False
    head, _, leaf = parent.rpartition(".")
    node = OmegaConf.select(cfg, head) if head else cfg
    return isinstance(node, DictConfig) and _is_free_dict(node, leaf)


def to_dict(cfg: Any) -> dict:
    """A plain dict of a config dataclass (for JSON logs and checkpoints)."""
    return OmegaConf.to_container(OmegaConf.structured(cfg), resolve=True)


def save_resolved_config(cfg: Any, out_dir: str | os.PathLike, name: str = "config.yaml") -> Path:
    """Write the fully resolved config next to a recipe's outputs."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    target = out / name
    atomic_write_text(target, OmegaConf.to_yaml(OmegaConf.structured(cfg)))
    return target


def describe_schema(schema: type, prefix: str = "") -> list[str]:
    """One line per key: `key (type) = default  # help` for `--help` epilogs."""
    lines = []
    for field in dataclasses.fields(schema):
        name = f"{prefix}{field.name}"
        ftype = field.type if isinstance(field.type, str) else getattr(field.type, "__name__", str(field.type))
        if dataclasses.is_dataclass(
            field.default_factory if field.default_factory is not dataclasses.MISSING else None
        ):
            lines.extend(describe_schema(field.default_factory, prefix=f"{name}."))
            continue
        if field.default is not dataclasses.MISSING:
            default = field.default
        elif field.default_factory is not dataclasses.MISSING:
            default = field.default_factory()
        else:
            default = "???"
        doc = field.metadata.get("help", "")
        lines.append(f"  {name} ({ftype}) = {default!r}" + (f"  # {doc}" if doc else ""))
    return lines


def add_config_arguments(
    parser, schema: type, config_help: str, overrides_example: str, config_required: bool = False
) -> None:
    """The arguments every config-driven recipe takes: `--config FILE` and `key=value` overrides,
    with every key of `schema` and its default listed in `--help`."""
    parser.add_argument("--config", required=config_required, help=config_help)
    parser.add_argument("overrides", nargs="*", metavar="key=value", help=f"config overrides, e.g. {overrides_example}")
    parser.epilog = "config keys:\n" + "\n".join(describe_schema(schema))
