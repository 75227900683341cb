"""Loading: YAML (duplicate keys refused), `-o key=value` overrides, and the walk
that checks each key and value against the dataclasses of `config.schema`."""

from __future__ import annotations

import dataclasses
import difflib
import math
import re
import types
import typing
from pathlib import Path
from typing import Any, Literal

import yaml

from archer_mcore.config.checks import validate_config
from archer_mcore.config.errors import ConfigError, _at, _Origin
from archer_mcore.config.schema import ALGORITHM_PRESETS, AlgorithmConfig, Config


def _describe(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_describe(a) for a in typing.get_args(tp))
    if origin is list:
        return f"a list of {_describe(typing.get_args(tp)[0])}"
    if tp is type(None):
        return "null"
    return getattr(tp, "__name__", str(tp))


_YAML11_FLOAT = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+")


def _coerce(value: Any, tp: Any, key: str, source: str) -> Any:
    """Check `value` against annotation `tp`; return it (ints widen to float)."""
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{_at(source, key)}: {key} must be a mapping, got {value!r}")
        return _build(tp, value, key + ".", source)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        if float in args and isinstance(value, str) and _YAML11_FLOAT.fullmatch(value.strip()):
            value = float(value)
        if float in args and isinstance(value, float) and not math.isfinite(value):
            return _coerce(value, float, key, source)  # raises: must be a finite number
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, key, source)
            except ConfigError:
                continue
        raise ConfigError(f"{_at(source, key)}: {key} must be {_describe(tp)}, got {value!r}")
    if origin is Literal:
        if value not in typing.get_args(tp):
            raise ConfigError(f"{_at(source, key)}: {key} must be {_describe(tp)}, got {value!r}")
        return value
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{_at(source, key)}: {key} must be {_describe(tp)}, got {value!r}")
        (item,) = typing.get_args(tp)
        return [_coerce(v, item, f"{key}[{i}]", source) for i, v in enumerate(value)]
    if tp is float and isinstance(value, str) and _YAML11_FLOAT.fullmatch(value.strip()):
        value = float(value)  # YAML 1.1 reads "1e-6" (no dot) as a string
    ok = {
        bool: isinstance(value, bool),
        int: isinstance(value, int) and not isinstance(value, bool),
        float: isinstance(value, (int, float)) and not isinstance(value, bool),
        str: isinstance(value, str),
    }.get(tp)
    if ok is None:
        raise ConfigError(f"{_at(source, key)}: {key} has an unsupported type {tp!r}")
    if not ok:
        raise ConfigError(f"{_at(source, key)}: {key} must be {_describe(tp)}, got {value!r}")
    if tp is float and not math.isfinite(value):
        # YAML's .inf / .nan (or 1e999): a learning rate of inf makes every weight NaN.
        raise ConfigError(f"{_at(source, key)}: {key} must be a finite number, got {value!r}")
    return float(value) if tp is float else value


def _check_range(value: Any, meta: typing.Mapping[str, Any], key: str, source: str) -> None:
    if value is None or isinstance(value, (bool, str, list)):
        return
    bounds = {
        "gt": (lambda a, b: a > b, ">"),
        "ge": (lambda a, b: a >= b, ">="),
        "lt": (lambda a, b: a < b, "<"),
        "le": (lambda a, b: a <= b, "<="),
    }
    for name, (ok, _) in bounds.items():
        if name in meta and not ok(value, meta[name]):
            lo = [f"{bounds[n][1]} {meta[n]}" for n in ("gt", "ge", "lt", "le") if n in meta]
            raise ConfigError(
                f"{_at(source, key)}: {key} = {value!r} is out of range: must be {' and '.join(lo)}"
            )


def _build(cls: type, raw: dict[str, Any], prefix: str, source: str) -> Any:
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    if cls is AlgorithmConfig:
        name = raw.get("name", AlgorithmConfig.name)
        if name not in ALGORITHM_PRESETS:
            raise ConfigError(
                f"{_at(source, prefix + 'name')}: {prefix}name must be one of {', '.join(ALGORITHM_PRESETS)}, got {name!r}"
            )
        raw = {**ALGORITHM_PRESETS[name], **raw}
    kwargs = {}
    for key, value in raw.items():
        dotted = prefix + str(key)
        if key not in fields:
            near = difflib.get_close_matches(str(key), list(fields), n=1)
            hint = f" (did you mean {prefix}{near[0]}?)" if near else ""
            raise ConfigError(f"{_at(source, dotted)}: unknown key {dotted}{hint}")
        value = _coerce(value, hints[key], dotted, source)
        _check_range(value, fields[key].metadata, dotted, source)
        kwargs[key] = value
    return cls(**kwargs)


def set_dotted(raw: dict[str, Any], dotted: str, value: Any) -> None:
    """Set raw["a"]["b"]["c"] = value for dotted = "a.b.c", creating mappings."""
    node = raw
    parts = dotted.split(".")
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"override {dotted}: {part} is not a section")
        node = child
    node[parts[-1]] = value


def apply_overrides(raw: dict[str, Any], overrides: typing.Iterable[str]) -> dict[str, Any]:
    """Apply `key.path=value` strings (values parsed as YAML) to a raw config mapping."""
    for item in overrides:
        key, sep, text = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"override {item!r} is not of the form key.path=value")
        try:
            value = yaml.load(text, Loader=_UniqueKeyLoader) if text.strip() else ""
        except ConfigError as exc:
            raise ConfigError(f"override {item!r}: {exc}") from None
        except yaml.YAMLError as exc:
            raise ConfigError(
                f"override {item!r}: the value is not valid YAML: {_one_line(exc)}"
            ) from None
        set_dotted(raw, key.strip(), value)
    return raw


def _one_line(exc: yaml.YAMLError) -> str:
    return " ".join(str(exc).split())


class _UniqueKeyLoader(yaml.SafeLoader):
    """yaml.SafeLoader that refuses a mapping with the same key twice (plain PyYAML
    keeps the last one silently)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            line = key_node.start_mark.line + 1
            try:
                first = seen.setdefault(key, line)
            except TypeError:  # an unhashable key: let PyYAML report it
                continue
            if first != line:
                raise ConfigError(
                    f"duplicate key {key!r} at line {line} (first set at line {first})"
                )
        return super().construct_mapping(node, deep=deep)


def config_from_dict(raw: dict[str, Any] | None, source: str = "<config>") -> Config:
    """Build and validate a `Config` from a plain mapping."""
    raw = raw or {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: the top level must be a mapping, got {type(raw).__name__}")
    cfg = _build(Config, raw, "", source)
    validate_config(cfg, source)
    return cfg


def load_config(path: str | Path, overrides: typing.Iterable[str] = ()) -> Config:
    """Load a YAML config file, apply overrides, validate. Errors name file and key."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read config: {exc.strerror or exc}") from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(
            f"{path}: not UTF-8 text (byte 0x{data[exc.start]:02x} at offset {exc.start})"
        ) from None
    try:
        raw = yaml.load(text, Loader=_UniqueKeyLoader) or {}
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: invalid YAML: {_one_line(exc)}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: the top level must be a mapping, got {type(raw).__name__}")
    overrides = list(overrides)
    origins = {}
    for item in overrides:
        key, _, _ = item.partition("=")
        origins[key.strip()] = item
    raw = apply_overrides(raw, overrides)
    return config_from_dict(raw, _Origin(str(path), origins))


def to_dict(cfg: Config) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def dump_yaml(cfg: Config) -> str:
    """The fully resolved config as YAML (loads back to an equal config)."""
    return yaml.safe_dump(to_dict(cfg), sort_keys=False, default_flow_style=False)
