"""Test-case parsing for code data sets and the judge's output comparison (no sandbox)."""

from __future__ import annotations

import json

import pytest

from archer_mcore.rewards.code_reward import extract_program
from archer_mcore.rewards.code_tests import (
    BadTestCases,
    CallCase,
    StdioCase,
    parse_test_cases,
    stdout_matches,
    values_equal,
)


def test_apps_stdio_and_function_forms() -> None:
    stdio = parse_test_cases(json.dumps({"inputs": ["1 2\n", "5 5\n"], "outputs": ["3\n", "10\n"]}))
    assert stdio == [StdioCase("1 2\n", "3\n"), StdioCase("5 5\n", "10\n")]
    calls = parse_test_cases({"fn_name": "add", "inputs": [[1, 2], [3, 4]], "outputs": [[3], [7]]})
    assert calls == [CallCase("add", [1, 2], [3]), CallCase("add", [3, 4], [7])]
    # APPS sometimes stores a stdin case as a list of lines
    assert parse_test_cases({"inputs": [["1", "2"]], "outputs": [["3"]]}) == [
        StdioCase("1\n2", "3")
    ]


def test_livecodebench_forms() -> None:
    cases = parse_test_cases(
        [
            {"input": "3\n1 2 3\n", "output": "6\n", "testtype": "stdin"},
            {"input": '[1, 2]\n"x"', "output": "[2, 1]", "testtype": "functional"},
        ],
        fn_name="solve",
    )
    assert cases == [StdioCase("3\n1 2 3\n", "6\n"), CallCase("solve", [[1, 2], "x"], [2, 1])]
    # DeepCoder stores the name in the case's metadata
    meta = [
        {"input": "3", "output": "9", "testtype": "functional", "metadata": {"func_name": "sq"}}
    ]
    assert parse_test_cases(json.dumps(meta)) == [CallCase("sq", [3], 9)]


@pytest.mark.parametrize(
    "bad",
    [
        "not json",
        {"inputs": ["1"], "outputs": []},
        {"inputs": [], "outputs": []},
        [{"input": "1"}],
        [{"input": "1", "output": "2", "testtype": "functional"}],  # no fn_name
        42,
    ],
)
def test_bad_ground_truth(bad: object) -> None:
    with pytest.raises(BadTestCases):
        parse_test_cases(bad)


def test_stdout_matches_like_a_judge() -> None:
    assert stdout_matches("3\n", "3")
    assert stdout_matches("1 2  3 \n4\n\n", "1 2 3\n4")  # whitespace layout ignored
    assert stdout_matches("0.3333333", "0.33333333")  # |diff| = 3.3e-9 < 1e-6
    assert not stdout_matches("0.334", "0.333")
    assert not stdout_matches("1 2", "1 2 3")
    assert stdout_matches("nan", "nan")  # identical text
    assert not stdout_matches("nan", "0.0")
    assert not stdout_matches("abc", "abd")


def test_values_equal() -> None:
    assert values_equal((1, 2), [1, 2])  # tuples compare as JSON lists
    assert values_equal(0.1 + 0.2, 0.3)
    assert values_equal({"a": [1.0]}, {"a": [1]})
    assert not values_equal(True, 1)
    assert not values_equal([1, 2], [2, 1])


def test_extract_program() -> None:
    resp = (
        "text\n```python\nprint(1)\n```\nmore\n```cpp\nint main(){}\n```\n```python\nprint(2)\n```"
    )
    assert extract_program(resp) == "print(2)\n"
    assert extract_program("```\nx = 1\n```") == "x = 1\n"
    assert extract_program("```cpp\nint main(){}\n```") is None
    assert extract_program("no code") is None
