"""`ConfigError` and where a config value came from (the file, or a `-o` override)."""

from __future__ import annotations


class ConfigError(ValueError):
    """A bad config: the message names the file and the dotted key."""


class _Origin(str):
    """A config file's name that also knows which dotted keys `-o` overrides set, so
    that an error in an overridden value blames the override, not the file."""

    overrides: dict[str, str]

    def __new__(cls, path: str, overrides: dict[str, str]) -> _Origin:
        obj = super().__new__(cls, path)
        obj.overrides = overrides
        return obj


def _at(source: str, key: str) -> str:
    """Where the value of dotted `key` came from: "override KEY=VALUE" or the file."""
    if isinstance(source, _Origin):
        parts = key.replace("[", ".[").split(".")
        for i in range(len(parts), 0, -1):
            prefix = ".".join(parts[:i]).replace(".[", "[")
            if prefix in source.overrides:
                return f"override {source.overrides[prefix]!r}"
    return str(source)
