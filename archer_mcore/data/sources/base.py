"""What every source converter shares: reading the published files, errors that name
the file, line and field, and writing the trainer's rows atomically.

Input (`read_records`): a file or a directory of files as a user's cache of the hub
copy holds them: `.parquet`, `.jsonl` / `.ndjson` (one JSON object per line), or
`.json` (a JSON array of objects, or JSON lines). A directory is read file by file in
name order (its supported files only, not recursively). Locations are "line N"
(1-based, JSON lines), "row N" (0-based, Parquet) and "item N" (0-based, JSON array).

Output (`write_rows`): the verl-style rows of `archer_mcore.data.schema`, as JSONL
(`.jsonl`) or Parquet (`.parquet`), written to a temporary sibling and renamed into
place (`archer_mcore.utils.safe_files.write_atomic`): a failed conversion leaves no
file, and never half a file, at --out.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from archer_mcore.config.errors import clip, shorten

#: File suffixes read as input, and how.
JSON_LINES = (".jsonl", ".ndjson")
JSON_FILE = (".json",)
PARQUET = (".parquet", ".pq")
SUPPORTED = JSON_LINES + JSON_FILE + PARQUET


class SourceError(ValueError):
    """A record the converter cannot turn into a row; the message starts with
    "FILE:LOCATION: field 'NAME'" so that the user can find and fix it."""


@dataclass(frozen=True)
class Record:
    """One published record and where it was read (file and "line N" / "row N")."""

    file: str
    location: str
    data: dict[str, Any]

    @property
    def where(self) -> str:
        return f"{self.file}:{self.location}"

    def error(self, field_name: str, why: str) -> SourceError:
        """A SourceError naming this record's file, location and `field_name`."""
        return SourceError(f"{self.where}: field {field_name!r}: {why}")

    def text(self, *names: str, required: bool = True) -> str:
        """The first of the fields `names` present with a non-empty value, as text
        (numbers as their decimal text: AIME answers are integers in some copies);
        "" when none is present and not `required`, else a SourceError."""
        for name in names:
            value = self.data.get(name)
            if value is None:
                continue
            if isinstance(value, bool) or not isinstance(value, (str, int, float)):
                raise self.error(name, f"expected text, got {type(value).__name__} {clip(value)}")
            text = str(value).strip()
            if text:
                return text
        if not required:
            return ""
        listed = " or ".join(repr(n) for n in names)
        present = ", ".join(sorted(self.data)) or "none"
        raise SourceError(
            f"{self.where}: field {listed}: missing or empty (fields present: {shorten(present)})"
        )


@dataclass(kw_only=True)
class Conversion:
    """The rows a converter made, and what it left out (counted, with the reasons)."""

    rows: list[dict[str, Any]] = field(default_factory=list)
    records_read: int = 0
    duplicates: int = 0
    filtered: int = 0  # records a converter's selection left out (LiveCodeBench dates)
    skipped: list[str] = field(default_factory=list)  # "file:line: reason"

    def summary(self) -> str:
        parts = [f"{self.records_read} records read, {len(self.rows)} rows written"]
        if self.duplicates:
            parts.append(f"{self.duplicates} duplicates dropped")
        if self.filtered:
            parts.append(f"{self.filtered} outside the selection")
        if self.skipped:
            parts.append(f"{len(self.skipped)} bad records skipped")
        return ", ".join(parts)


def input_files(path: str | Path) -> list[Path]:
    """The files to read for `path`: the file itself, or a directory's supported files
    in name order. SourceError when there are none."""
    p = Path(path)
    if not p.exists():
        raise SourceError(f"--input {p}: no such file or directory")
    if p.is_dir():
        files = sorted(f for f in p.iterdir() if f.is_file() and f.suffix.lower() in SUPPORTED)
        if not files:
            raise SourceError(f"--input {p}: a directory with no {'/'.join(SUPPORTED)} file in it")
        return files
    if p.suffix.lower() not in SUPPORTED:
        raise SourceError(
            f"--input {p}: unsupported file type {p.suffix!r} (expected {'/'.join(SUPPORTED)})"
        )
    return [p]


def _json_lines(path: Path) -> Iterator[tuple[str, Any]]:
    """Records of a JSON-lines file, read line by line."""
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, start=1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as err:
                raise SourceError(
                    f"{path}:line {lineno}: not UTF-8 text (byte 0x{raw[err.start]:02x})"
                ) from None
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except (ValueError, RecursionError) as err:
                raise SourceError(
                    f"{path}:line {lineno}: invalid JSON: {shorten(str(err))}"
                ) from None
            yield f"line {lineno}", record


def _starts_with_bracket(path: Path) -> bool:
    with open(path, "rb") as f:
        head = f.read(4096).lstrip(b"\xef\xbb\xbf \t\r\n")
    return head.startswith(b"[")


def _records_of(path: Path) -> Iterator[tuple[str, Any]]:
    suffix = path.suffix.lower()
    if suffix in PARQUET:
        try:
            import pyarrow.parquet as pq
        except ImportError as err:
            raise SourceError(f"reading {path} needs pyarrow (pip install pyarrow)") from err
        import pyarrow as pa

        index = 0
        try:
            batches = pq.ParquetFile(path).iter_batches(batch_size=256)
            for batch in batches:
                rows = batch.to_pylist()
                for row in rows:
                    yield f"row {index}", row
                    index += 1
        except (pa.ArrowException, OSError) as err:
            raise SourceError(f"{path}:row {index}: unreadable Parquet: {err}") from None
        return
    if suffix in JSON_FILE and _starts_with_bracket(path):
        try:
            items = json.loads(path.read_bytes())
        except (ValueError, RecursionError) as err:  # also: not UTF-8
            raise SourceError(f"{path}: invalid JSON: {shorten(str(err))}") from None
        for index, item in enumerate(items):
            yield f"item {index}", item
        return
    yield from _json_lines(path)


def read_records(path: str | Path) -> Iterator[Record]:
    """Every record under `path` (module docstring); a SourceError for a file that
    cannot be decoded or a record that is not a JSON object."""
    for file in input_files(path):
        for location, data in _records_of(file):
            if not isinstance(data, dict):
                raise SourceError(
                    f"{file}:{location}: expected a JSON object, got {type(data).__name__}"
                )
            yield Record(str(file), location, data)


def user_prompt(text: str) -> list[dict[str, str]]:
    """The verl prompt of one user message."""
    return [{"role": "user", "content": text}]


def verl_row(
    *,
    data_source: str,
    prompt: list[dict[str, str]],
    ground_truth: Any,
    ability: str,
    extra_info: dict[str, Any],
) -> dict[str, Any]:
    """One output row of the trainer's schema (`archer_mcore.data.schema`)."""
    return {
        "data_source": data_source,
        "prompt": prompt,
        "ability": ability,
        "reward_model": {"style": "rule", "ground_truth": ground_truth},
        "extra_info": extra_info,
    }


def encode_rows(rows: list[dict[str, Any]], out: Path) -> bytes:
    """The bytes of `rows` as `out`'s suffix says: JSONL or Parquet. Parquet needs one
    type per column: every converter writes the ground truth as text (a code row's test
    cases as JSON text) and extra_info with values of one type per key."""
    suffix = out.suffix.lower()
    if suffix in (".jsonl", ".ndjson"):
        return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows).encode()
    if suffix in PARQUET:
        import pyarrow as pa
        import pyarrow.parquet as pq

        table = pa.Table.from_pylist(rows)
        sink = pa.BufferOutputStream()
        pq.write_table(table, sink)
        return sink.getvalue().to_pybytes()
    raise SourceError(f"--out {out}: unsupported output type {suffix!r} (.jsonl or .parquet)")


def write_rows(rows: list[dict[str, Any]], out: str | Path) -> Path:
    """Write `rows` to `out` atomically (module docstring); the output path."""
    from archer_mcore.utils.safe_files import write_atomic

    path = Path(out)
    data = encode_rows(rows, path)  # before anything is created: a bad suffix writes nothing
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, data)
    return path
