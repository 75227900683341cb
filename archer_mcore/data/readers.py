"""Read raw rows from JSONL and Parquet files, keeping each row's location.

`read_rows(path)` yields `(location, row_or_error)`: the location is "line N"
(1-based) for JSONL and "row N" (0-based) for Parquet; the second item is the row
dict, or a `str` saying why the record could not be decoded. Blank JSONL lines are
skipped. Parquet needs pyarrow, imported only when a Parquet file is read.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from archer_mcore.config.errors import shorten

RawRecord = tuple[str, "dict[str, Any] | str"]


def read_jsonl(path: Path) -> Iterator[RawRecord]:
    """Rows of a JSONL file. A line that is not valid UTF-8 is a bad record (saying
    which byte), never silently repaired with U+FFFD and kept."""
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, start=1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as err:
                yield (
                    f"line {lineno}",
                    f"not UTF-8 text (byte 0x{raw[err.start]:02x} at column {err.start + 1})",
                )
                continue
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except (ValueError, RecursionError) as err:  # also: nested too deep, huge ints
                yield f"line {lineno}", f"invalid JSON: {shorten(str(err) or type(err).__name__)}"
                continue
            yield (
                f"line {lineno}",
                row if isinstance(row, dict) else f"not a JSON object: {type(row).__name__}",
            )


def read_parquet(path: Path, batch_size: int = 1024) -> Iterator[RawRecord]:
    try:
        import pyarrow.parquet as pq
    except ImportError as err:
        raise ImportError(f"reading {path} needs pyarrow (pip install pyarrow)") from err
    index = 0
    for batch in pq.ParquetFile(path).iter_batches(batch_size=batch_size):
        for row in batch.to_pylist():
            yield f"row {index}", row
            index += 1


def read_rows(path: str | Path) -> Iterator[RawRecord]:
    """Rows of a .jsonl/.json(l) or .parquet file; the suffix chooses the reader."""
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"data file not found: {p}")
    suffix = p.suffix.lower()
    if suffix in (".jsonl", ".json", ".ndjson"):
        return read_jsonl(p)
    if suffix in (".parquet", ".pq"):
        return read_parquet(p)
    raise ValueError(f"unsupported data file type {suffix!r} for {p} (expected .jsonl or .parquet)")
