"""Plain data (YAML, ``key=value`` overrides) to validated dataclasses: the one merge rule, the one
"either this or that" rule, typed coercion with key-path errors. No torch, no model code.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from deftx.errors import ConfigError


def fail(key: str, problem: str) -> ConfigError:
    """A :class:`ConfigError` naming the key path: ``a.b.c: problem``."""
    return ConfigError(f"{key}: {problem}")


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", str(tp)).replace("NoneType", "null")


def _coerce(value: Any, tp: Any, key: str) -> Any:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None and len(args) < len(typing.get_args(tp)):
            return None
        if len(args) == 1:
            return _coerce(value, args[0], key)
        for arg in args:
            try:
                return _coerce(value, arg, key)
            except ConfigError:
                continue
        raise fail(key, f"expected {' or '.join(_type_name(a) for a in args)}, got {value!r}")
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise fail(key, f"expected a mapping, got {value!r}")
        return from_dict(tp, value, key)
    if origin is list:
        (item,) = typing.get_args(tp)
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, list):
            raise fail(key, f"expected a list, got {value!r}")
        return [_coerce(v, item, f"{key}[{i}]") for i, v in enumerate(value)]
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise fail(key, f"expected true or false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise fail(key, f"expected an integer, got {value!r}")
    if tp is float:
        number: float | None = None
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            number = float(value)
        elif isinstance(value, str):  # YAML 1.1 reads "1e-3" (no dot) as a string
            try:
                number = float(value)
            except ValueError:
                pass
        if number is None:
            raise fail(key, f"expected a number, got {value!r}")
        if not math.isfinite(number):   # NaN passes every `<` check and Inf every `>` check below
            raise fail(key, f"must be a finite number, got {value!r}")
        return number
    if tp is str:
        if isinstance(value, str):
            return value
        raise fail(key, f"expected a string, got {value!r}")
    return value


def from_dict(cls: type, data: dict[str, Any], prefix: str = "") -> Any:
    """Build dataclass ``cls`` from nested plain data; unknown keys are errors."""
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in data.items():
        full = f"{prefix}.{key}" if prefix else str(key)
        if key not in names:
            raise fail(full, f"unknown key; valid keys here: {', '.join(names)}")
        kwargs[key] = _coerce(value, hints[key], full)
    return cls(**kwargs)


def to_dict(config: Any) -> dict[str, Any]:
    return dataclasses.asdict(config)


# The either-or rule: pairs of alternatives where giving one clears the other, so that
# `--set ...rank=8` needs no `energy=null` (and a preset's density gives way to a k). The
# validation of SelectionConfig then requires exactly one of each pair.
EXCLUSIVE = (("rank", "energy"), ("density", "k"))


def clear_alternatives(merged: dict[str, Any], given: dict[str, Any]) -> dict[str, Any]:
    """``merged`` with the alternative of every pair member that ``given`` sets (to a non-null
    value, without also setting the alternative) cleared to None."""
    for a, b in EXCLUSIVE:
        for chosen, other in ((a, b), (b, a)):
            if given.get(chosen) is not None and other not in given and other in merged:
                merged[other] = None
    return merged


def merge(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    """The one merge rule: nested mappings merge key by key, anything else replaces; then the
    either-or rule (:func:`clear_alternatives`) at every level."""
    out = dict(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge(out[key], value)
        else:
            out[key] = value
    return clear_alternatives(out, update)


def parse_override(text: str) -> tuple[list[str], Any]:
    """``a.b.c=value`` -> (["a", "b", "c"], parsed YAML value)."""
    if "=" not in text:
        raise ConfigError(f"--set {text!r}: expected key=value")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key or any(not part for part in key.split(".")):
        raise ConfigError(f"--set {text!r}: empty key")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return key.split("."), value


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    for text in overrides:
        path, value = parse_override(text)
        nested: Any = value
        for part in reversed(path):
            nested = {part: nested}
        data = merge(data, nested)
    return data


def preset_names() -> list[str]:
    return sorted(p.name[:-5] for p in resources.files("deftx.presets").iterdir() if p.name.endswith(".yaml"))


def summary_line(text: str) -> str:
    """The first sentence of a preset file's leading comment (its one-line description)."""
    lines = []
    for line in text.splitlines():
        if not line.startswith("#"):
            break
        lines.append(line.lstrip("#").strip())
    first = " ".join(lines)
    if first.startswith("`") and "`: " in first:   # "`deftx experiment ... --preset x`: what it is"
        first = first.split("`: ", 1)[1]
    cut = first.find(". ")
    return (first[:cut + 1] if cut >= 0 else first)[:160]


def preset_summary(name: str) -> str:
    return summary_line(resources.files("deftx.presets").joinpath(f"{name}.yaml").read_text(encoding="utf-8"))


def read_yaml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if path.is_dir():
        raise ConfigError(f"config file {path} is a directory, not a YAML file")
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as exc:
        first = str(exc).splitlines()[0] if str(exc) else "syntax error"
        raise ConfigError(f"config file {path}: invalid YAML ({first})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path}: expected a mapping at the top level")
    return data


def read_preset(name: str) -> dict[str, Any]:
    names = preset_names()
    if name not in names:
        raise ConfigError(f"unknown preset {name!r}; valid: {', '.join(names)}")
    text = resources.files("deftx.presets").joinpath(f"{name}.yaml").read_text(encoding="utf-8")
    return yaml.safe_load(text) or {}


