"""Code sources: LiveCodeBench code generation (v5 / v6 releases) and the Archer paper's
code data.

Every output row is routed to the sandboxed code reward (`archer_mcore.rewards.registry`
CODE_SOURCES: "livecodebench", "*code*"); its ground truth is the JSON text of a list of
LiveCodeBench-style cases, `{"input", "output", "testtype": "stdin" | "functional"[,
"fn_name"]}`, which `archer_mcore.rewards.code_tests.parse_test_cases` reads: stdin
cases feed `input` to the program and compare its stdout with `output`; functional
cases call `fn_name` (a top-level function or a method of LeetCode's `class Solution`)
with the JSON values of `input`'s lines as arguments and compare the return value with
`output`'s JSON value. Every row's cases are parsed that way while converting, so a
row the reward could not read is refused here, naming the file, line and field.

LiveCodeBench, hub `livecodebench/code_generation_lite` (its loader
`code_generation_lite.py` and LiveCodeBench's `lcb_runner/benchmarks/code_generation.py`
`CodeGenerationProblem`): files `test.jsonl`, `test2.jsonl` ... `test6.jsonl`, one per
release increment (v5 = test..test5, v6 = test..test6: give the directory, or the files,
of the release wanted; --since/--until select problems by `contest_date`). Fields:
question_title, question_content, platform, question_id, contest_id, contest_date (ISO
date-time), starter_code (empty for stdin problems), difficulty, public_test_cases (JSON
text of a list of {input, output, testtype}), private_test_cases (the same JSON text,
or, in most releases, base64 of zlib of a *pickle* of that JSON text), metadata (JSON
text; "func_name" for functional problems).

Pickled private tests are never unpickled (`pickle.loads` runs code named in the data).
By default such a row is refused naming the field `private_test_cases`; with
`decode_string_pickle` (CLI --decode-string-pickles) the pickle is read by
`string_from_pickle`, which walks its opcodes with `pickletools.genops` (a parser: it
builds no object and imports nothing) and accepts only a pickle whose whole content is
one string; with `public_only` (CLI --public-tests-only) the private tests are left out
(a weaker check: say so when reporting results).

The Archer paper's code data (Wang et al. 2025, "Stabilizing Knowledge, Promoting
Reasoning: Dual-Token Constraints for RLVR", arXiv 2507.15778; repository
wizard-III/ArcherCodeR): hub `wizardII/ArcherCodeR-Dataset` (also
`Fate-Zero/ArcherCodeR-Dataset`), `train/archercoder-1.5b-train.json` and
`test/livecodebench_v5.json`, JSON arrays of verl rows. What is established from the
repository (its `tools/convert_lcb_raw_to_verl.py`, which writes the test file's
schema; the 2.5 GB training file itself was not read): `data_source`, `prompt`
[{"role": "user", "content"}], `ability` "code", `reward_model` {"style": "rule",
"ground_truth": JSON text of the {input, output, testtype} list}, `extra_info`. Rows
are read as such verl rows; a ground truth in APPS form ({"inputs", "outputs"[,
"fn_name"]}) is accepted too, since `parse_test_cases` reads it.
"""

from __future__ import annotations

import base64
import binascii
import json
import pickletools
import zlib
from collections.abc import Callable, Iterable
from typing import Any

from archer_mcore.config.errors import clip
from archer_mcore.data.schema import MalformedRow, parse_row
from archer_mcore.data.sources.base import (
    Conversion,
    Record,
    SourceError,
    user_prompt,
    verl_row,
)
from archer_mcore.rewards.code_tests import BadTestCases, parse_test_cases

#: The largest decompressed private-test text accepted (bytes); larger is refused.
MAX_DECOMPRESSED_BYTES = 1 << 30

SYSTEM_TEXT = (
    "You are an expert Python programmer. You are given a problem statement; write a "
    "correct Python program that meets it and passes all of its tests."
)
WITH_STARTER = (
    "Complete the starter code below. Put your whole solution in one ```python fenced code block."
)
WITHOUT_STARTER = (
    "Read the input from standard input and write the answer to standard output (do "
    "not hard-code the sample inputs). Put your whole program in one ```python fenced "
    "code block."
)

#: The pickle opcodes of a pickled str (any protocol); anything else is refused.
_STRING_OPCODES = {"UNICODE", "SHORT_BINUNICODE", "BINUNICODE", "BINUNICODE8"}
_FRAMING_OPCODES = {"PROTO", "FRAME", "MEMOIZE", "PUT", "BINPUT", "LONG_BINPUT", "STOP"}


def string_from_pickle(data: bytes, where: str) -> str:
    """The string a pickle holds, read from its opcodes without unpickling.

    Only a pickle of exactly one `str` is accepted (protocol, framing and memo opcodes
    around one string opcode); anything else (a global, a reduce, a second object) is a
    SourceError naming `where`. `pickletools.genops` only parses: no object is built and
    no module imported.
    """
    found: list[str] = []
    try:
        for opcode, arg, _pos in pickletools.genops(data):
            if opcode.name in _STRING_OPCODES and isinstance(arg, str):
                found.append(arg)
            elif opcode.name not in _FRAMING_OPCODES:
                raise SourceError(
                    f"{where}: the pickle holds more than one string (opcode {opcode.name}); "
                    "archer never unpickles, so it cannot read this field"
                )
    except (ValueError, EOFError) as err:  # genops on malformed bytes
        raise SourceError(f"{where}: not a readable pickle: {err}") from None
    if len(found) != 1:
        raise SourceError(f"{where}: expected a pickle of one string, found {len(found)}")
    return found[0]


def _inflate(data: bytes, where: str) -> bytes:
    inflater = zlib.decompressobj()
    try:
        out = inflater.decompress(data, MAX_DECOMPRESSED_BYTES)
    except zlib.error as err:
        raise SourceError(f"{where}: not zlib data: {err}") from None
    if inflater.unconsumed_tail:
        raise SourceError(
            f"{where}: decompresses to more than {MAX_DECOMPRESSED_BYTES >> 20} MiB; refused"
        )
    return out


def _json_cases(record: Record, name: str, text: Any) -> list[dict[str, Any]]:
    if not isinstance(text, str):
        raise record.error(name, f"expected JSON text, got {type(text).__name__}")
    try:
        cases = json.loads(text)
    except (ValueError, RecursionError) as err:
        raise record.error(name, f"not JSON: {err}") from None
    if not isinstance(cases, list):
        raise record.error(name, f"expected a JSON list of cases, got {type(cases).__name__}")
    for k, case in enumerate(cases):
        if not isinstance(case, dict) or "input" not in case or "output" not in case:
            raise record.error(name, f"case {k} is not an object with 'input' and 'output'")
    return cases


def private_cases(
    record: Record, *, decode_string_pickle: bool, public_only: bool
) -> list[dict[str, Any]]:
    """LiveCodeBench's private tests: JSON text, or base64+zlib+pickle of JSON text
    (module docstring for what is read and what is refused)."""
    name = "private_test_cases"
    raw = record.data.get(name)
    if public_only:
        return []
    if raw is None or (isinstance(raw, str) and not raw.strip()):
        raise record.error(name, "missing (use --public-tests-only to convert without it)")
    if not isinstance(raw, str):
        raise record.error(name, f"expected text, got {type(raw).__name__}")
    if raw.lstrip().startswith("["):
        return _json_cases(record, name, raw)
    if not decode_string_pickle:
        raise record.error(
            name,
            "is base64+zlib+pickle, and archer never unpickles; pass "
            "--decode-string-pickles to read it with a string-only opcode reader (no "
            "object is built), or --public-tests-only to leave the private tests out",
        )
    where = f"{record.where}: field {name!r}"
    try:
        packed = base64.b64decode(raw.encode("ascii"), validate=True)
    except (binascii.Error, UnicodeEncodeError) as err:
        raise SourceError(f"{where}: neither JSON nor base64: {err}") from None
    text = string_from_pickle(_inflate(packed, where), where)
    return _json_cases(record, name, text)


def _metadata(record: Record) -> dict[str, Any]:
    raw = record.data.get("metadata")
    if raw is None or raw == "":
        return {}
    if isinstance(raw, dict):
        return raw
    try:
        meta = json.loads(raw) if isinstance(raw, str) else None
    except ValueError as err:
        raise record.error("metadata", f"not JSON: {err}") from None
    if not isinstance(meta, dict):
        raise record.error("metadata", f"expected a JSON object, got {clip(raw)}")
    return meta


def lcb_prompt(question: str, starter_code: str) -> str:
    """The user message of a LiveCodeBench problem (the problem, then how to answer)."""
    if starter_code.strip():
        fmt = f"{WITH_STARTER}\n```python\n{starter_code.rstrip()}\n```"
    else:
        fmt = f"{WITHOUT_STARTER}\n```python\n# YOUR CODE HERE\n```"
    return f"{SYSTEM_TEXT}\n\n### Question:\n{question}\n\n### Format: {fmt}\n\n### Answer:\n"


def _normalised_cases(
    record: Record, name: str, cases: list[dict[str, Any]], fn_name: str
) -> list[dict[str, Any]]:
    out = []
    for k, case in enumerate(cases):
        testtype = case.get("testtype") or "stdin"
        if testtype not in ("stdin", "functional"):
            raise record.error(name, f"case {k}: unknown testtype {clip(testtype)}")
        if testtype == "functional" and not fn_name:
            raise record.error(
                "metadata", f"{name} case {k} is functional but metadata has no 'func_name'"
            )
        item = {"input": case["input"], "output": case["output"], "testtype": testtype}
        if testtype == "functional":
            item["fn_name"] = fn_name
        out.append(item)
    return out


def _checked_ground_truth(record: Record, name: str, cases: Any, fn_name: str) -> str:
    """`cases` as JSON text, after the code reward's own parser read it."""
    text = cases if isinstance(cases, str) else json.dumps(cases, ensure_ascii=False)
    try:
        parse_test_cases(text, fn_name or None)
    except BadTestCases as err:
        raise record.error(name, f"the code reward cannot read these tests: {err}") from None
    return text


def _in_window(record: Record, since: str, until: str) -> bool:
    if not since and not until:
        return True
    date = record.text("contest_date")[:10]  # ISO: YYYY-MM-DD[THH:MM:SS]
    return (not since or date >= since) and (not until or date < until)


def _lcb_row(record: Record, *, decode_string_pickle: bool, public_only: bool) -> dict[str, Any]:
    question = record.text("question_content")
    starter = record.data.get("starter_code") or ""
    if not isinstance(starter, str):
        raise record.error("starter_code", f"expected text, got {type(starter).__name__}")
    meta = _metadata(record)
    fn_name = str(meta.get("func_name") or "")
    public = _json_cases(record, "public_test_cases", record.data.get("public_test_cases"))
    private = private_cases(
        record, decode_string_pickle=decode_string_pickle, public_only=public_only
    )
    cases = _normalised_cases(record, "public_test_cases", public, fn_name)
    cases += _normalised_cases(record, "private_test_cases", private, fn_name)
    if not cases:
        raise record.error("public_test_cases", "no test case at all")
    ground_truth = _checked_ground_truth(record, "public_test_cases", cases, fn_name)
    return verl_row(
        data_source="livecodebench",
        prompt=user_prompt(lcb_prompt(question, starter)),
        ground_truth=ground_truth,
        ability="code",
        extra_info={
            "index": record.text("question_id", required=False) or record.location,
            "question_title": record.text("question_title", required=False),
            "platform": record.text("platform", required=False),
            "contest_date": record.text("contest_date", required=False),
            "difficulty": record.text("difficulty", required=False),
            "fn_name": fn_name,
            "public_tests": len(public),
            "private_tests": len(private),
        },
    )


def _collect(
    records: Iterable[Record],
    make: Callable[[Record], dict[str, Any] | None],
    skip_bad: bool,
) -> Conversion:
    """Rows of `make(record)` (None: left out on purpose); a SourceError stops, or with
    `skip_bad` is listed in the result."""
    result = Conversion()
    for record in records:
        result.records_read += 1
        try:
            row = make(record)
        except SourceError as err:
            if not skip_bad:
                raise
            result.skipped.append(str(err))
            continue
        if row is None:
            result.filtered += 1
        else:
            result.rows.append(row)
    return result


def livecodebench(
    records: Iterable[Record],
    *,
    since: str = "",
    until: str = "",
    decode_string_pickle: bool = False,
    public_only: bool = False,
    skip_bad: bool = False,
) -> Conversion:
    """LiveCodeBench problems (module docstring) as code-reward rows.

    since / until: keep problems with since <= contest_date < until ("YYYY-MM-DD";
    empty: no bound). skip_bad: list a bad record instead of raising.
    """

    def make(record: Record) -> dict[str, Any] | None:
        if not _in_window(record, since, until):
            return None
        return _lcb_row(record, decode_string_pickle=decode_string_pickle, public_only=public_only)

    return _collect(records, make, skip_bad)


def _archer_row(record: Record) -> dict[str, Any]:
    try:
        row = parse_row(record.data, default_data_source="archer_code")
    except MalformedRow as err:
        raise SourceError(f"{record.where}: {err}") from None
    fn_name = str(row.extra_info.get("fn_name") or "")
    ground_truth = _checked_ground_truth(
        record, "reward_model.ground_truth", row.ground_truth, fn_name
    )
    from archer_mcore.rewards.registry import default_registry

    kind = default_registry().kind_for(row.data_source)
    data_source = row.data_source if kind is not None and kind.name == "code" else "archer_code"
    return verl_row(
        data_source=data_source,
        prompt=row.messages,
        ground_truth=ground_truth,
        ability="code",
        extra_info={
            "index": str(row.extra_info.get("index", record.location)),
            "fn_name": fn_name,
            "original_data_source": row.data_source,
        },
    )


def archer_code(records: Iterable[Record], *, skip_bad: bool = False) -> Conversion:
    """The Archer paper's code rows (module docstring): verl rows, their tests checked
    by the code reward's parser; a data_source that would not route to the code reward
    becomes "archer_code" (the original kept in extra_info.original_data_source)."""
    return _collect(records, _archer_row, skip_bad)
