"""`ConfigError`, where a config value came from (the file, or a `-o` override), and
the bounded echo of values in error messages.

Error messages quote what the user wrote, and what the user wrote may be huge (a
megabyte scalar, a YAML alias bomb, a thousand-level nested list): every value an error
echoes goes through `clip` (a bounded repr, computed without building the full repr)
or `shorten` (bounded plain text), and `ConfigError` itself cuts any message longer
than `MAX_ERROR_CHARS` in the middle, as a backstop for a call site that forgot.
"""

from __future__ import annotations

import reprlib
from typing import Any

#: The longest echo of one value in an error message (`clip`, `shorten`).
MAX_VALUE_CHARS = 300
#: The longest `ConfigError` message; longer ones are cut in the middle.
MAX_ERROR_CHARS = 2000


def shorten(text: str, limit: int = MAX_VALUE_CHARS) -> str:
    """`text` if it has at most `limit` characters, else its head and tail around a
    "...[N chars]..." marker, `limit` characters at most in all."""
    text = str(text)
    if len(text) <= limit:
        return text
    marker = f"...[{len(text)} chars]..."
    keep = max(limit - len(marker), 0)
    head = keep - keep // 4
    return text[:head] + marker + text[len(text) - (keep - head) :]


def _bounded_repr() -> reprlib.Repr:
    r = reprlib.Repr()
    r.maxlevel = 3
    r.maxtuple = r.maxlist = r.maxarray = r.maxdeque = 6
    r.maxdict = r.maxset = r.maxfrozenset = 6
    r.maxstring = r.maxother = 160
    r.maxlong = 60
    return r


_REPR = _bounded_repr()


def clip(value: Any, limit: int = MAX_VALUE_CHARS) -> str:
    """A repr of `value` of at most `limit` characters, in time that does not grow with
    the value: strings keep their head and say their length, containers show their
    first items to a few levels (`reprlib`), anything else is cut."""
    if isinstance(value, str):
        if len(value) <= limit - 2:
            return shorten(repr(value), limit)
        head = repr(value[: max(limit - 40, 8)])
        return shorten(f"{head}... ({len(value)} chars)", limit)
    try:
        text = _REPR.repr(value)
    except (ValueError, RecursionError):  # e.g. an int past Python's digit limit
        text = f"<{type(value).__name__}>"
    return shorten(text, limit)


class ConfigError(ValueError):
    """A bad config: the message names the file and the dotted key. Messages longer
    than `MAX_ERROR_CHARS` are cut in the middle."""

    def __init__(self, *args: object) -> None:
        if len(args) == 1 and isinstance(args[0], str):
            args = (shorten(args[0], MAX_ERROR_CHARS),)
        super().__init__(*args)


class _Origin(str):
    """A config file's name that also knows which dotted keys `-o` overrides set, so
    that an error in an overridden value blames the override, not the file."""

    overrides: dict[str, str]

    def __new__(cls, path: str, overrides: dict[str, str]) -> _Origin:
        obj = super().__new__(cls, path)
        obj.overrides = overrides
        return obj


def _at(source: str, key: str) -> str:
    """Where the value of dotted `key` came from: "override KEY=VALUE" (the override
    clipped) or the file."""
    if isinstance(source, _Origin):
        parts = key.replace("[", ".[").split(".")
        for i in range(len(parts), 0, -1):
            prefix = ".".join(parts[:i]).replace(".[", "[")
            if prefix in source.overrides:
                return f"override {clip(source.overrides[prefix])}"
    return shorten(str(source), 1000)
