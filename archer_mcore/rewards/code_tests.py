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
"""

from __future__ import annotations

import contextlib
import json
import math
from dataclasses import dataclass
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
        return [json.loads(line) for line in value.splitlines() if line.strip()]
    except json.JSONDecodeError as err:
        raise BadTestCases(f"functional test input is not JSON lines: {err}") from err


def parse_test_cases(ground_truth: Any, fn_name: str | None = None) -> list[TestCase]:
    """The test cases described by `ground_truth` (see the module docstring)."""
    gt = ground_truth
    if isinstance(gt, (bytes, bytearray)):
        gt = gt.decode()
    if isinstance(gt, str):
        try:
            gt = json.loads(gt)
        except json.JSONDecodeError as err:
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
                    with contextlib.suppress(json.JSONDecodeError):
                        expected = json.loads(expected)
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


def _tokens_equal(a: str, b: str, rel_tol: float = 1e-6, abs_tol: float = 1e-6) -> bool:
    if a == b:
        return True
    try:
        x, y = float(a), float(b)
    except ValueError:
        return False
    if math.isnan(x) or math.isnan(y):
        return False
    return math.isclose(x, y, rel_tol=rel_tol, abs_tol=abs_tol)


def _equal(a: Any, b: Any) -> bool:
    if isinstance(a, bool) or isinstance(b, bool):
        return a is b or (a == b and type(a) is type(b))
    if isinstance(a, (int, float)) and isinstance(b, (int, float)):
        return math.isclose(a, b, rel_tol=1e-6, abs_tol=1e-6)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(_equal(x, y) for x, y in zip(a, b))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_equal(a[k], b[k]) for k in a)
    return a == b


def values_equal(result: Any, expected: Any) -> bool:
    """A call's result against the expected value: both as JSON values (tuples are
    lists, dict keys strings), floats equal to 1e-6, booleans only equal booleans.
    Called in the trusted process on the result the sandboxed program sent out."""
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
        result = json.loads(result_json)
    except (ValueError, RecursionError):
        return False
    return values_equal(result, expected) or (
        isinstance(expected, list) and len(expected) == 1 and values_equal(result, expected[0])
    )


def stdout_matches(actual: str, expected: str) -> bool:
    """Judge stdout the way online judges do: same whitespace-separated tokens, numbers
    equal to 1e-6 (relative or absolute); line breaks and trailing spaces ignored."""
    a, e = actual.split(), expected.split()
    return len(a) == len(e) and all(_tokens_equal(x, y) for x, y in zip(a, e))
