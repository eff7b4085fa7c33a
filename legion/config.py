"""Typed configs: a dataclass schema + a YAML file + `key=value` overrides from the command line.

    cfg = load_config(TrainConfig, "configs/tiny/train_loc_exp.yaml", ["optim.lr=3e-4"])

Unknown or mistyped keys are errors that name the key and the closest valid one, so a typo in
a 3-day training config fails in the first second instead of being silently ignored.

Renamed keys stay accepted for one release: a config dataclass (the top-level schema or any nested
section) declares them in a class attribute

    RENAMED: ClassVar[dict[str, tuple[str, dict | None]]] = {
        "precision": ("dtype", {"bf16": "bfloat16", "fp32": "float32"}),   # old key -> (new key, value map)
    }

with keys relative to that dataclass. An old key in the YAML file or in a `key=value` override is
rewritten to the new key (its value through the optional map) with one line on stderr; a file or an
override list that gives both the old and the new key is an error. This is the one mechanism for
deprecated config keys.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import sys
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


def renamed_keys(schema: type, prefix: str = "") -> dict[str, tuple[str, dict | None]]:
    """Every deprecated key of `schema` and its nested sections: full old key -> (full new key, value map)."""
    renamed = getattr(schema, "RENAMED", None) or {}
    found = {f"{prefix}{old}": (f"{prefix}{new}", mapping) for old, (new, mapping) in renamed.items()}
    for field in dataclasses.fields(schema):
        factory = field.default_factory if field.default_factory is not dataclasses.MISSING else None
        if isinstance(factory, type) and dataclasses.is_dataclass(factory):
            found.update(renamed_keys(factory, prefix=f"{prefix}{field.name}."))
    return found


def _deprecation(where: str, old: str, new: str) -> None:
    print(
        f"{where}: config key '{old}' is deprecated: use '{new}' (accepted until the next release)",
        file=sys.stderr,
        flush=True,
    )


def _map_value(value: Any, mapping: dict | None) -> Any:
    if mapping and isinstance(value, str) and value in mapping:
        return mapping[value]
    return value


def _rename_in_file(data: dict, renames: dict[str, tuple[str, dict | None]], where: str) -> None:
    """Rewrite deprecated keys of a YAML mapping in place (old key -> new key, value mapped)."""
    for old, (new, mapping) in renames.items():
        *old_parents, old_leaf = old.split(".")
        holder = data
        for part in old_parents:
            holder = holder.get(part) if isinstance(holder, dict) else None
        if not isinstance(holder, dict) or old_leaf not in holder:
            continue
        *new_parents, new_leaf = new.split(".")
        target = data
        for part in new_parents:
            if target.get(part) is None:
                target[part] = {}
            target = target[part]
            if not isinstance(target, dict):
                break
        if not isinstance(target, dict):
            continue  # a malformed section: the schema check reports it
        if new_leaf in target:
            raise ConfigError(f"{where}: both '{old}' (deprecated) and '{new}' are given; keep only '{new}'")
        target[new_leaf] = _map_value(holder.pop(old_leaf), mapping)
        _deprecation(where, old, new)


def _rename_overrides(overrides: Sequence[str], renames: dict[str, tuple[str, dict | None]]) -> list[tuple[str, Any]]:
    """`key=value` strings -> (key, parsed value) with deprecated keys rewritten."""
    parsed: list[tuple[str, Any]] = []
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override '{item}' is not of the form key=value")
        key, value = item.split("=", 1)
        key = key.strip().lstrip("-")
        parsed.append((key, _parse_value(value)))
    given = {key for key, _ in parsed}
    out = []
    for key, value in parsed:
        if key in renames:
            new, mapping = renames[key]
            if new in given:
                raise ConfigError(f"override: both '{key}' (deprecated) and '{new}' are given; keep only '{new}'")
            _deprecation("override", key, new)
            key, value = new, _map_value(value, mapping)
        out.append((key, value))
    return out


def load_config_with_flags(schema: type[T], args, flags: dict[str, Any]) -> T:
    """`load_config` from `args.config` and `args.overrides`, then the command's own flags
    ({config key: value}; unset ones skipped), which win over both."""
    extra = [f"{key}={value}" for key, value in flags.items() if value]
    return load_config(schema, args.config, list(args.overrides) + extra)


def load_config(schema: type[T], path: str | os.PathLike | None = None, overrides: Sequence[str] = ()) -> T:
    """Build a `schema` dataclass instance from defaults <- YAML file <- `key=value` overrides.

    Deprecated keys (the schema's `RENAMED`, module docstring) are rewritten in each source on its own:
    an old key in the file and its new key on the command line is fine (the command line wins)."""
    base = OmegaConf.structured(schema)
    renames = renamed_keys(schema)
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
            _rename_in_file(data, renames, str(path))
            _check_keys(base, data, str(path))
            merged = OmegaConf.merge(merged, data)
        for key, parsed in _rename_overrides(overrides, renames):
            parent, _, leaf = key.rpartition(".")
            node = OmegaConf.select(merged, parent) if parent else merged
            if not isinstance(node, DictConfig) or (leaf not in node and not _accepts_any_key(merged, parent)):
                raise ConfigError(f"override: unknown config key '{key}'{_closest(key, _all_keys(merged))}")
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
    renames = renamed_keys(schema)
    if renames:
        parser.epilog += "\n\ndeprecated config keys (accepted until the next release):\n" + "\n".join(
            f"  {old} -> {new}" for old, (new, _) in renames.items()
        )
