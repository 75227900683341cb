"""Converters from public datasets, as published on the Hugging Face hub, to the
trainer's verl-style rows (`archer data prepare SOURCE --input PATH --out FILE`).

    conversion = prepare("math500", source_path="MATH-500/test.jsonl", out="data/math500.jsonl")
    print(conversion.summary())

A source family is one module of this package (its docstring cites the published
format); SOURCES maps each SOURCE name to its converter and the options it takes. A new
source is a new module, registered below. Nothing here downloads: the input is a local
file or directory (base.read_records), and the output is written atomically
(base.write_rows). See docs/data.md.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from archer_mcore.data.sources import code, math
from archer_mcore.data.sources.base import Conversion, SourceError, read_records, write_rows

Converter = Callable[..., Conversion]


@dataclass(frozen=True)
class Source:
    """A SOURCE of `archer data prepare`: its converter, a one-line description, and
    the keyword options (beyond skip_bad) the converter takes."""

    convert: Converter
    description: str
    options: tuple[str, ...] = ()


_MATH_OPTIONS = ("keep_duplicates",)
_LCB_OPTIONS = ("since", "until", "decode_string_pickle", "public_only")

#: SOURCE name -> Source. A new source is a new module, registered below.
SOURCES: dict[str, Source] = {
    "dapo-math-17k": Source(
        math.dapo_math_17k, "BytedTsinghua-SIA/DAPO-Math-17k (verl parquet)", _MATH_OPTIONS
    ),
    "aime2024": Source(
        math.aime_2024, "HuggingFaceH4/aime_2024, Maxwell-Jia/AIME_2024", _MATH_OPTIONS
    ),
    "aime2025": Source(math.aime_2025, "opencompass/AIME2025, yentinglin/aime_2025", _MATH_OPTIONS),
    "math500": Source(math.math_500, "HuggingFaceH4/MATH-500", _MATH_OPTIONS),
    "deepscaler": Source(
        math.deepscaler,
        "agentica-org/DeepScaleR-Preview-Dataset and {problem, answer} sets",
        _MATH_OPTIONS,
    ),
    "livecodebench": Source(
        code.livecodebench, "livecodebench/code_generation_lite (v5, v6)", _LCB_OPTIONS
    ),
    "archer-code": Source(code.archer_code, "wizardII/ArcherCodeR-Dataset (verl JSON)"),
}


def prepare(
    source: str, *, source_path: str | Path, out: str | Path, skip_bad: bool = False, **options: Any
) -> Conversion:
    """Convert `source_path` (file or directory) of `source` and write the rows to `out`
    (.jsonl or .parquet, atomically). SourceError naming the file, line and field of a
    bad record (or, with skip_bad, such records are listed in the result); nothing is
    written when no row is left."""
    entry = SOURCES.get(source)
    if entry is None:
        raise SourceError(f"unknown SOURCE {source!r}; known: {', '.join(SOURCES)}")
    unknown = sorted(set(options) - set(entry.options))
    if unknown:
        raise SourceError(f"SOURCE {source!r} takes no option {', '.join(unknown)}")
    result = entry.convert(read_records(source_path), skip_bad=skip_bad, **options)
    if not result.rows:
        raise SourceError(f"--input {source_path}: no row to write ({result.summary()})")
    write_rows(result.rows, out)
    return result


__all__ = ["SOURCES", "Conversion", "Source", "SourceError", "prepare"]
