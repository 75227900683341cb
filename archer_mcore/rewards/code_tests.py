"""Test cases of code RL data sets, and how a program's output is compared.

Accepted ground-truth shapes (a dict/list, or the same as a JSON string):

* APPS / TACO / PRIME style: `{"inputs": [...], "outputs": [...]}` are stdin/stdout
  cases (strings); with `"fn_name": "f"` they are function-call cases, each input a
  list of positional arguments and each output the expected return value (APPS wraps
  it in a one-element list; both forms are accepted).
* LiveCodeBench / DeepCoder style: a list of `{"input": ..., "output": ...,
  "testtype": "stdin" | "functional"}`; functional inputs are one JSON value per line
  (the arguments), outputs a JSON value; the function name comes from `"fn_name"` or
  `"metadata": {"func_name"}` in the case, or from `fn_name` passed alongside
  (`extra["fn_name"]`).

How outputs are judged (`stdout_matches`, `values_equal`): LiveCodeBench
(lcb_runner/evaluation/testing_util.py) compares stripped output lines, then each
line's whitespace-separated tokens as `Decimal`s, exactly; APPS and this module's
former version used a float tolerance for every number, which made "1000000008" equal
to "1000000007" (relative difference 1e-9 < 1e-6). The rule here:

* identical tokens match;
* an expected token that is an integer (ASCII digits, optional sign) matches only the
  same integer, exactly, written as Codeforces' testlib reads one (`stringToLongLong`
  in testlib.h: an optional "-", ASCII digits 0-9, no leading zeros and no "-0"): so
  no "+5", "05", "5_0" or non-ASCII digits ("\u0665"), which Python's `int()` accepts
  but a judge does not, and no "2.0" for 2;
* an expected token that is a decimal float matches any number (ASCII, optional "-",
  decimal point, exponent) within 1e-6 absolute or relative to the expected value
  (testlib's `doubleCompare`), computed with `Decimal`, so numbers past float range
  (1e400) are neither infinite nor equal to each other, and nothing overflows; "inf"
  and "nan" are words, equal only to themselves;
* anything else matches only itself.

Function-call results are JSON values: integers equal only the same integer (an int
or an integral float such as 3.0, as Python's `==`, LiveCodeBench's functional check),
floats within the tolerance above when the expected value is a float; NaN and
infinities match nothing (testlib refuses them as doubles); JSON numbers past float
range or past Python's int-from-text limit are kept exact (`Decimal`), not read as
inf or refused.
"""

from __future__ import annotations

import contextlib
import decimal
import json
import math
import re
from dataclasses import dataclass
from decimal import Decimal
from typing import Any


class BadTestCases(ValueError):
    """The ground truth does not describe usable test cases."""


@dataclass(frozen=True)
class StdioCase:
    stdin: str
    expected_stdout: str


@dataclass(frozen=True)
class CallCase:
    fn_name: str
    args: list[Any]
    expected: Any


TestCase = StdioCase | CallCase


def _as_text(value: Any) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return "\n".join(value)
    return json.dumps(value) if not isinstance(value, (int, float)) else str(value)


def _parse_lcb_args(value: Any) -> list[Any]:
    if isinstance(value, list):
        return value
    if not isinstance(value, str):
        return [value]
    try:
        return [exact_json(line) for line in value.splitlines() if line.strip()]
    except json.JSONDecodeError as err:
        raise BadTestCases(f"functional test input is not JSON lines: {err}") from err


def parse_test_cases(ground_truth: Any, fn_name: str | None = None) -> list[TestCase]:
    """The test cases described by `ground_truth` (see the module docstring)."""
    gt = ground_truth
    if isinstance(gt, (bytes, bytearray)):
        gt = gt.decode()
    if isinstance(gt, str):
        try:
            gt = exact_json(gt)
        except (json.JSONDecodeError, RecursionError) as err:
            raise BadTestCases(f"code ground truth is not JSON: {err}") from err
    if isinstance(gt, dict) and "inputs" in gt and "outputs" in gt:
        inputs, outputs = gt["inputs"], gt["outputs"]
        if (
            not isinstance(inputs, list)
            or not isinstance(outputs, list)
            or len(inputs) != len(outputs)
        ):
            raise BadTestCases("'inputs' and 'outputs' must be lists of equal length")
        name = gt.get("fn_name") or fn_name
        if name:
            return [
                CallCase(str(name), i if isinstance(i, list) else [i], o)
                for i, o in zip(inputs, outputs)
            ] or _empty()
        return [StdioCase(_as_text(i), _as_text(o)) for i, o in zip(inputs, outputs)] or _empty()
    if isinstance(gt, list):
        cases: list[TestCase] = []
        for k, case in enumerate(gt):
            if not isinstance(case, dict) or "input" not in case or "output" not in case:
                raise BadTestCases(f"test case {k} must be a dict with 'input' and 'output'")
            if case.get("testtype", "stdin") == "functional":
                meta = case.get("metadata") if isinstance(case.get("metadata"), dict) else {}
                name = case.get("fn_name") or meta.get("func_name") or fn_name
                if not name:
                    raise BadTestCases(f"functional test case {k} has no fn_name")
                expected = case["output"]
                if isinstance(expected, str):
                    with contextlib.suppress(json.JSONDecodeError, RecursionError):
                        expected = exact_json(expected)
                cases.append(CallCase(str(name), _parse_lcb_args(case["input"]), expected))
            else:
                cases.append(StdioCase(_as_text(case["input"]), _as_text(case["output"])))
        return cases or _empty()
    raise BadTestCases(
        "code ground truth must be {'inputs', 'outputs'[, 'fn_name']} or a list of "
        f"{{'input', 'output'}} cases, got {type(gt).__name__}"
    )


def _empty() -> list[TestCase]:
    raise BadTestCases("no test cases")


class BigInt(Decimal):
    """A JSON integer too long for `int()` from text (Python's 4300-digit limit), exact."""


#: Longest JSON integer read as an int; longer ones become `BigInt` (int() refuses them).
_MAX_INT_DIGITS = 4000


def _json_int(text: str) -> int | Decimal:
    return int(text) if len(text) <= _MAX_INT_DIGITS else BigInt(text)


def _json_float(text: str) -> float | Decimal:
    value = float(text)
    return value if math.isfinite(value) else Decimal(text)  # 1e400: exact, not inf


def exact_json(text: str | bytes) -> Any:
    """`json.loads`, but numbers keep their value: floats past float range and integers
    past `int()`'s digit limit become `Decimal`s instead of inf / a ValueError."""
    return json.loads(text, parse_int=_json_int, parse_float=_json_float)


def _plain_number(value: Any) -> Any:
    if isinstance(value, BigInt):
        return int(value)
    if isinstance(value, Decimal):
        return float(value)  # what json.loads made of it before: the program's argument
    raise TypeError(f"{type(value).__name__} is not JSON serialisable")


def to_json(value: Any) -> str:
    """`json.dumps` that also writes the numbers `exact_json` keeps as `Decimal`s (call
    arguments sent into the sandbox)."""
    return json.dumps(value, default=_plain_number)


#: Decimal arithmetic for the comparisons: any exponent, no exception (a NaN result
#: compares false), 40 significant digits (the tolerance is 1e-6).
_DECIMAL = decimal.Context(
    prec=40, Emax=decimal.MAX_EMAX, Emin=decimal.MIN_EMIN, traps=[], flags=[]
)
#: testlib's EPS for doubles: absolute, or relative to the expected value.
FLOAT_TOLERANCE = Decimal("1e-6")
_EXPECTED_INT = re.compile(r"[+-]?[0-9]++")
_JUDGE_INT = re.compile(r"0|-?[1-9][0-9]*+")  # testlib stringToLongLong
_EXPECTED_FLOAT = re.compile(r"[+-]?(?:[0-9]++(?:\.[0-9]*+)?|\.[0-9]++)(?:[eE][+-]?[0-9]++)?")
_JUDGE_NUMBER = re.compile(r"-?(?:[0-9]++(?:\.[0-9]*+)?|\.[0-9]++)(?:[eE][+-]?[0-9]++)?")


def _close(actual: Decimal, expected: Decimal) -> bool:
    """|actual - expected| <= 1e-6 * max(1, |expected|), exactly enough, never raising."""
    if not (actual.is_finite() and expected.is_finite()):
        return False
    with decimal.localcontext(_DECIMAL):
        return abs(actual - expected) <= FLOAT_TOLERANCE * max(Decimal(1), abs(expected))


def _int_digits(token: str) -> str:
    """Canonical text of an integer token: no "+", no leading zeros, "0" unsigned."""
    negative = token.startswith("-")
    digits = token.lstrip("+-").lstrip("0") or "0"
    return "-" + digits if negative and digits != "0" else digits


def _tokens_equal(actual: str, expected: str) -> bool:
    """One output token against the expected one (rule: the module docstring)."""
    if actual == expected:
        return True
    if _EXPECTED_INT.fullmatch(expected):
        return bool(_JUDGE_INT.fullmatch(actual)) and _int_digits(actual) == _int_digits(expected)
    if _EXPECTED_FLOAT.fullmatch(expected) and _JUDGE_NUMBER.fullmatch(actual):
        try:
            return _close(Decimal(actual), Decimal(expected))
        except ArithmeticError:  # an exponent past Decimal's range
            return False
    return False


def _is_number(x: Any) -> bool:
    return isinstance(x, (int, float, Decimal)) and not isinstance(x, bool)


def _as_decimal(x: int | float | Decimal) -> Decimal:
    return x if isinstance(x, Decimal) else Decimal(x)  # exact for ints and floats


def _numbers_equal(result: int | float | Decimal, expected: int | float | Decimal) -> bool:
    """Integers exactly; floats within the tolerance when a float is expected; NaN and
    infinities never."""
    if isinstance(result, float) and not math.isfinite(result):
        return False
    if isinstance(expected, float) and not math.isfinite(expected):
        return False
    try:
        r, e = _as_decimal(result), _as_decimal(expected)
        if isinstance(expected, (int, BigInt)):
            return r == e  # exact: 10**9 + 8 != 10**9 + 7
        return _close(r, e)
    except ArithmeticError:
        return False


def _equal(a: Any, b: Any) -> bool:
    """Result `a` against expected `b`."""
    if isinstance(a, bool) or isinstance(b, bool):
        return a is b or (a == b and type(a) is type(b))
    if _is_number(a) and _is_number(b):
        return _numbers_equal(a, b)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(_equal(x, y) for x, y in zip(a, b))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_equal(a[k], b[k]) for k in a)
    return a == b


def values_equal(result: Any, expected: Any) -> bool:
    """A call's result against the expected value: both as JSON values (tuples are
    lists, dict keys strings), integers exactly, floats to 1e-6 when the expected value
    is a float (module docstring), booleans only equal booleans. Called in the trusted
    process on the result the sandboxed program sent out."""
    with contextlib.suppress(TypeError, ValueError, RecursionError):
        result = json.loads(json.dumps(result))
    with contextlib.suppress(TypeError, ValueError, RecursionError):
        expected = json.loads(json.dumps(expected))
    try:
        return _equal(result, expected)
    except RecursionError:
        return False


def call_result_matches(result_json: str, expected: Any) -> bool:
    """Judge a function-call case from the JSON text of the value the program returned.

    APPS wraps a case's expected value in a one-element list; the bare value is
    accepted too. Text that is not a JSON value never matches.
    """
    try:
        result = exact_json(result_json)
    except (ValueError, RecursionError, ArithmeticError):
        return False
    return values_equal(result, expected) or (
        isinstance(expected, list) and len(expected) == 1 and values_equal(result, expected[0])
    )


def stdout_matches(actual: str, expected: str) -> bool:
    """Judge stdout the way online judges do: the same whitespace-separated tokens (line
    breaks and trailing spaces ignored), numbers compared by the module docstring's
    rule: integers exactly, floats to 1e-6 where a float is expected."""
    a, e = actual.split(), expected.split()
    return len(a) == len(e) and all(_tokens_equal(x, y) for x, y in zip(a, e))
