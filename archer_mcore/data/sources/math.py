"""Math sources: DAPO-Math-17k, AIME 2024, AIME 2025, MATH-500, DeepScaleR-style sets.

Every output row is routed to the math reward (`archer_mcore.rewards.registry`
MATH_SOURCES: "math_dapo", "aime*", "*math*", "*deepscaler*"); its ground truth is the
published final answer as text (LaTeX kept as published, e.g. "\\frac{14}{3}"; an
integer answer as its decimal text). The math reward reads the response's last
\\boxed{} (or an "Answer: X" line, which DAPO's own prompt asks for).

Published formats (the field names read here):

* DAPO-Math-17k, hub `BytedTsinghua-SIA/DAPO-Math-17k`, `data/dapo-math-17k.parquet`
  (dataset card; verl's `recipe/dapo` reads it as is): already verl rows,
  `data_source` "math_dapo", `prompt` [{"role": "user", "content": ...}] whose text
  asks for a last line "Answer: $Answer", `ability` "MATH", `reward_model`
  {"ground_truth": "34", "style": "rule-lighteval/MATH_v2"}, `extra_info` {"index"}.
  The published file repeats every problem (about 1.79M rows for ~17k problems):
  duplicates (same prompt and answer) are dropped unless --keep-duplicates.
* AIME 2024: `HuggingFaceH4/aime_2024` (`data/train-*.parquet`: id, problem, solution,
  answer, url, year) or `Maxwell-Jia/AIME_2024` (`aime_2024_problems.parquet`: ID,
  Problem, Solution, Answer, an integer); the DAPO authors' verl copy
  `BytedTsinghua-SIA/AIME-2024` (verl rows, each problem repeated) is read like
  DAPO-Math-17k.
* AIME 2025: `opencompass/AIME2025` (`aime2025-I.jsonl`, `aime2025-II.jsonl`: question,
  answer), `yentinglin/aime_2025` (id, problem, solution, answer, url, year) or
  `MathArena/aime_2025` (problem_idx, problem, answer).
* MATH-500: `HuggingFaceH4/MATH-500`, `test.jsonl`: problem, solution, answer,
  subject, level, unique_id (verl's examples/data_preprocess/math_dataset.py takes the
  answer from the solution's last \\boxed{}; this split publishes it as `answer`).
* DeepScaleR: `agentica-org/DeepScaleR-Preview-Dataset`, `deepscaler.json` (a JSON
  array; the hub's parquet conversion has the same fields): problem, answer, solution.
  Any set of {problem, answer[, solution]} rows ("DeepScaleR-style") reads the same.

The prompt of the problem/answer sets is the problem followed by `BOXED_INSTRUCTION`
(DeepScaleR's and verl's convention for R1-style models).
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from typing import Any

from archer_mcore.data.schema import MalformedRow, parse_row
from archer_mcore.data.sources.base import (
    Conversion,
    Record,
    SourceError,
    user_prompt,
    verl_row,
)

BOXED_INSTRUCTION = "Let's think step by step and output the final answer within \\boxed{}."


def _verl_math_row(record: Record, data_source: str) -> tuple[dict[str, Any], str]:
    """A published verl row (DAPO's), checked by the trainer's own parser; its
    data_source is replaced by `data_source` only when it has none."""
    try:
        row = parse_row(record.data, default_data_source=data_source)
    except MalformedRow as err:
        raise SourceError(f"{record.where}: {err}") from None
    if isinstance(row.ground_truth, (dict, list)):
        raise record.error("reward_model.ground_truth", "a math answer must be text")
    extra = {"index": str(row.extra_info.get("index", record.location))}
    out = verl_row(
        data_source=row.data_source,
        prompt=row.messages,
        ground_truth=str(row.ground_truth).strip(),
        ability="math",
        extra_info=extra,
    )
    return out, json.dumps([row.messages, out["reward_model"]["ground_truth"]])


def _plain_math_row(
    record: Record,
    *,
    data_source: str,
    problem_keys: tuple[str, ...],
    answer_keys: tuple[str, ...],
    id_keys: tuple[str, ...],
) -> tuple[dict[str, Any], str]:
    problem = record.text(*problem_keys)
    answer = record.text(*answer_keys)
    ident = record.text(*id_keys, required=False) or record.location
    solution = record.text("solution", "Solution", required=False)
    extra = {"index": ident, "solution": solution}
    out = verl_row(
        data_source=data_source,
        prompt=user_prompt(f"{problem}\n\n{BOXED_INSTRUCTION}"),
        ground_truth=answer,
        ability="math",
        extra_info=extra,
    )
    return out, json.dumps([problem, answer])


def convert_math(
    records: Iterable[Record],
    *,
    data_source: str,
    problem_keys: tuple[str, ...] = ("problem", "Problem", "question"),
    answer_keys: tuple[str, ...] = ("answer", "Answer"),
    id_keys: tuple[str, ...] = ("id", "ID", "unique_id", "problem_idx"),
    keep_duplicates: bool = False,
    skip_bad: bool = False,
) -> Conversion:
    """Rows of the math reward from problem/answer records or verl records (a record
    with a "prompt" and a "reward_model" is read as verl; its own data_source kept).

    data_source: the output rows' data_source (it routes them to the math reward).
    skip_bad: leave a bad record out (listed in the result) instead of raising.
    """
    result = Conversion()
    seen: set[str] = set()
    for record in records:
        result.records_read += 1
        try:
            if "prompt" in record.data and "reward_model" in record.data:
                row, key = _verl_math_row(record, data_source)
            else:
                row, key = _plain_math_row(
                    record,
                    data_source=data_source,
                    problem_keys=problem_keys,
                    answer_keys=answer_keys,
                    id_keys=id_keys,
                )
        except SourceError as err:
            if not skip_bad:
                raise
            result.skipped.append(str(err))
            continue
        if not keep_duplicates:
            if key in seen:
                result.duplicates += 1
                continue
            seen.add(key)
        result.rows.append(row)
    return result


def dapo_math_17k(records: Iterable[Record], **options: Any) -> Conversion:
    """DAPO-Math-17k (module docstring); data_source "math_dapo"."""
    return convert_math(records, data_source="math_dapo", **options)


def aime_2024(records: Iterable[Record], **options: Any) -> Conversion:
    """AIME 2024 (module docstring); data_source "aime_2024"."""
    return convert_math(records, data_source="aime_2024", **options)


def aime_2025(records: Iterable[Record], **options: Any) -> Conversion:
    """AIME 2025 (module docstring); data_source "aime_2025"."""
    return convert_math(records, data_source="aime_2025", **options)


def math_500(records: Iterable[Record], **options: Any) -> Conversion:
    """MATH-500 (module docstring); data_source "math_500"."""
    return convert_math(records, data_source="math_500", **options)


def deepscaler(records: Iterable[Record], **options: Any) -> Conversion:
    """DeepScaleR-style {problem, answer} rows (module docstring); data_source
    "deepscaler"."""
    return convert_math(records, data_source="deepscaler", **options)
