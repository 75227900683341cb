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

from archer_mcore.config.algorithm import (
    AlgorithmConfig,
    TokenRuleConfig,
    expand_algorithm,
    token_rule_settings_class,
)
from archer_mcore.config.checks import validate_config
from archer_mcore.config.errors import ConfigError, _at, _Origin, clip, shorten
from archer_mcore.config.fields import field_docs
from archer_mcore.config.schema import Config


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


def _yaml11_float(value: Any) -> bool:
    """A string YAML 1.1 left unparsed that is a float ("1e-6"); long strings are not
    tried (the regex backtracks quadratically on a long run of digits)."""
    return (
        isinstance(value, str) and len(value) <= 64 and bool(_YAML11_FLOAT.fullmatch(value.strip()))
    )


def _coerce(value: Any, tp: Any, key: str, source: str) -> Any:
    """Check `value` against annotation `tp`; return it (ints widen to float)."""
    origin = typing.get_origin(tp)
    if tp is TokenRuleConfig:  # a tagged union: the name picks the settings class
        if not isinstance(value, dict):
            raise ConfigError(f"{_at(source, key)}: {key} must be a mapping, got {clip(value)}")
        rule = token_rule_settings_class(value.get("name", "none"), key, source)
        return _build(rule, value, key + ".", source)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{_at(source, key)}: {key} must be a mapping, got {clip(value)}")
        return _build(tp, value, key + ".", source)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        if float in args and _yaml11_float(value):
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
        raise ConfigError(f"{_at(source, key)}: {key} must be {_describe(tp)}, got {clip(value)}")
    if origin is Literal:
        if value not in typing.get_args(tp):
            raise ConfigError(
                f"{_at(source, key)}: {key} must be {_describe(tp)}, got {clip(value)}"
            )
        return value
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(
                f"{_at(source, key)}: {key} must be {_describe(tp)}, got {clip(value)}"
            )
        (item,) = typing.get_args(tp)
        return [_coerce(v, item, f"{key}[{i}]", source) for i, v in enumerate(value)]
    if tp is float and _yaml11_float(value):
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
        raise ConfigError(f"{_at(source, key)}: {key} must be {_describe(tp)}, got {clip(value)}")
    if tp is float and not math.isfinite(value):
        # YAML's .inf / .nan (or 1e999): a learning rate of inf makes every weight NaN.
        raise ConfigError(f"{_at(source, key)}: {key} must be a finite number, got {clip(value)}")
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
                f"{_at(source, key)}: {key} = {clip(value)} is out of range: must be {' and '.join(lo)}"
            )


def _build(cls: type, raw: dict[str, Any], prefix: str, source: str) -> Any:
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    if cls is AlgorithmConfig:  # the recipe under the keys, the old flat keys moved
        raw = expand_algorithm(raw, prefix, source)
    kwargs = {}
    for key, value in raw.items():
        dotted = prefix + str(key)
        if key not in fields:
            raise ConfigError(f"{_at(source, dotted)}: unknown key {_unknown(prefix, key, fields)}")
        value = _coerce(value, hints[key], dotted, source)
        _check_range(value, fields[key].metadata, dotted, source)
        kwargs[key] = value
    built = cls(**kwargs)
    if cls is AlgorithmConfig:
        built.token_rule.check(built, source)
    return built


def _unknown(prefix: str, key: Any, fields: typing.Iterable[str]) -> str:
    """The dotted name of an unknown key (clipped), with the nearest known key."""
    name = str(key) if isinstance(key, str) else clip(key)
    near = difflib.get_close_matches(name, list(fields), n=1) if len(name) <= 100 else []
    hint = f" (did you mean {prefix}{near[0]}?)" if near else ""
    return shorten(prefix + name) + hint


def set_dotted(raw: dict[str, Any], dotted: str, value: Any) -> None:
    """Set raw["a"]["b"]["c"] = value for dotted = "a.b.c", creating mappings."""
    node = raw
    parts = dotted.split(".")
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"override {shorten(dotted)}: {shorten(part)} is not a section")
        node = child
    node[parts[-1]] = value


#: The largest config file, and the largest `-o` override, read (configs are a few KB).
MAX_CONFIG_BYTES = 1 << 20
#: The most values a YAML document may hold, counting each use of an alias as the
#: values it repeats (a "billion laughs" document holds billions in a few hundred bytes).
MAX_YAML_VALUES = 20_000
#: The deepest nesting of YAML collections (configs nest a few levels).
MAX_YAML_DEPTH = 64


def apply_overrides(raw: dict[str, Any], overrides: typing.Iterable[str]) -> dict[str, Any]:
    """Apply `key.path=value` strings (values parsed as YAML) to a raw config mapping."""
    for item in overrides:
        key, sep, text = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"override {clip(item)} is not of the form key.path=value")
        if len(item) > MAX_CONFIG_BYTES:
            raise ConfigError(
                f"override {clip(item)}: {len(item)} characters, over the limit of "
                f"{MAX_CONFIG_BYTES}"
            )
        try:
            value = parse_yaml(text, "the value is not valid YAML") if text.strip() else ""
        except ConfigError as exc:
            raise ConfigError(f"override {clip(item)}: {exc}") from None
        set_dotted(raw, key.strip(), value)
    return raw


def parse_yaml(text: str, invalid: str = "invalid YAML") -> Any:
    """`text` parsed by `_UniqueKeyLoader`; every failure (bad YAML, an alias bomb, too
    deep a nesting, an integer past Python's digit limit) is a short `ConfigError`
    (`invalid` begins the message of a YAML syntax error)."""
    try:
        return yaml.load(text, Loader=_UniqueKeyLoader)
    except ConfigError:
        raise
    except yaml.YAMLError as exc:
        raise ConfigError(f"{invalid}: {_one_line(exc)}") from None
    except (ValueError, RecursionError) as exc:  # int("9" * 5000) in the int resolver
        raise ConfigError(f"{invalid}: {_one_line(exc)}") from None


def _one_line(exc: BaseException) -> str:
    return shorten(" ".join(str(exc).split()), 500)


class _UniqueKeyLoader(yaml.SafeLoader):
    """yaml.SafeLoader that refuses a mapping with the same key twice (plain PyYAML
    keeps the last one silently), and a document that nests deeper than
    `MAX_YAML_DEPTH` or holds more than `MAX_YAML_VALUES` values once its aliases are
    expanded (or an alias inside its own anchor): counted while composing, so a
    "billion laughs" document fails after reading a few hundred bytes, never expanded."""

    def __init__(self, stream: Any) -> None:
        super().__init__(stream)
        self._values = 0  # values composed so far, aliases counted expanded
        self._depth = 0
        self._sizes: dict[int, int] = {}  # id(node) -> its expanded size, once complete

    def _count(self, n: int, what: str) -> None:
        self._values += n
        if self._values > MAX_YAML_VALUES:
            raise ConfigError(
                f"the YAML holds more than {MAX_YAML_VALUES} values{what}; a config has a "
                "few hundred (is it a 'billion laughs' document?)"
            )

    def compose_node(self, parent: Any, index: Any) -> Any:
        if self.check_event(yaml.AliasEvent):
            anchor = self.peek_event().anchor
            node = super().compose_node(parent, index)
            size = self._sizes.get(id(node))
            if size is None:
                raise ConfigError(
                    f"YAML alias *{shorten(anchor, 80)} is used inside its own anchor"
                )
            self._count(size, f" once its aliases are expanded (at alias *{shorten(anchor, 80)})")
            return node
        if self._depth >= MAX_YAML_DEPTH:
            mark = self.peek_event().start_mark
            raise ConfigError(
                f"YAML nested deeper than {MAX_YAML_DEPTH} levels (line {mark.line + 1})"
            )
        before = self._values
        self._depth += 1
        try:
            node = super().compose_node(parent, index)
        finally:
            self._depth -= 1
        self._count(1, "")
        self._sizes[id(node)] = self._values - before
        return node

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
                    f"duplicate key {clip(key)} at line {line} (first set at line {first})"
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


def _read_config_bytes(path: Path) -> bytes:
    """The file's bytes; ConfigError when it cannot be read or exceeds MAX_CONFIG_BYTES
    (read no further than that)."""
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_CONFIG_BYTES + 1)
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read config: {exc.strerror or exc}") from None
    if len(data) > MAX_CONFIG_BYTES:
        raise ConfigError(
            f"{path}: over {MAX_CONFIG_BYTES} bytes; a config file is a few KB (is this "
            "the right file?)"
        )
    return data


def load_config(path: str | Path, overrides: typing.Iterable[str] = ()) -> Config:
    """Load a YAML config file, apply overrides, validate. Errors name file and key."""
    path = Path(path)
    data = _read_config_bytes(path)
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(
            f"{path}: not UTF-8 text (byte 0x{data[exc.start]:02x} at offset {exc.start})"
        ) from None
    try:
        raw = parse_yaml(text) or {}
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}") from None
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


def dump_yaml(cfg: Config, docs: bool = False) -> str:
    """The fully resolved config as YAML (loads back to an equal config); with `docs`,
    each documented field (an attribute docstring, `config.fields.field_docs`) has its
    documentation as comments above it."""
    if not docs:
        return yaml.safe_dump(to_dict(cfg), sort_keys=False, default_flow_style=False)
    return "".join(_documented(cfg, ""))


def _documented(obj: Any, indent: str) -> list[str]:
    """The YAML lines of dataclass `obj` with its fields' docs as comments."""
    lines: list[str] = []
    docs = field_docs(type(obj))
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if f.name in docs:
            lines += [f"{indent}# {line}".rstrip() + "\n" for line in docs[f.name].splitlines()]
        if dataclasses.is_dataclass(value):
            lines += [f"{indent}{f.name}:\n", *_documented(value, indent + "  ")]
        else:
            if isinstance(value, list):  # e.g. a list of sections: plain mappings
                value = [dataclasses.asdict(v) if dataclasses.is_dataclass(v) else v for v in value]
            text = yaml.safe_dump({f.name: value}, default_flow_style=False, width=10**6)
            lines += [indent + line + "\n" for line in text.splitlines()]
    return lines
