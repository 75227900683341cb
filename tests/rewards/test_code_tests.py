"""Test-case parsing for code data sets and the judge's output comparison (no sandbox)."""

from __future__ import annotations

import json

import pytest

from archer_mcore.rewards.code_reward import extract_program
from archer_mcore.rewards.code_tests import (
    BadTestCases,
    CallCase,
    StdioCase,
    call_result_matches,
    parse_test_cases,
    stdout_matches,
    to_json,
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


# ---------------------------------------------------------------- exact integers (issue 22.9)
# The rule (code_tests module docstring): a token that is an integer in the expected
# output matches only the same integer, written as testlib's stringToLongLong reads one
# (Codeforces' checkers): an optional "-", ASCII digits, no leading zeros, no "+", "_"
# or other digits. Floats keep a tolerance only when the expected token is a float.
@pytest.mark.parametrize(
    ("actual", "expected"),
    [
        ("1000000008", "1000000007"),  # off by one past a million: rel. diff 1e-9
        ("1000001", "1000000"),
        ("999999999999999999", "1000000000000000000"),
        ("12345678901234567890123456789", "12345678901234567890123456788"),
        ("1" + "0" * 400, "2" + "0" * 400),  # past float range: not inf == inf
        ("1" + "0" * 400 + "1", "1" + "0" * 401),
        ("2.0", "2"),  # an integer is expected: a float is not one
        ("+5", "5"),
        ("05", "5"),
        ("-0", "0"),
        ("5_0", "50"),
        ("\u0665", "5"),  # ARABIC-INDIC DIGIT FIVE: int() reads it, a judge does not
        ("\uff15", "5"),  # FULLWIDTH DIGIT FIVE
        ("1e400", "2e400"),  # floats past float range are not all infinite
        ("inf", "1e400"),
        ("1e400", "inf"),
        ("+0.5", "0.5"),
        ("0.5_0", "0.50"),
        ("nan", "0.5"),
        ("0x10", "16"),
    ],
)
def test_stdout_numbers_that_differ_do_not_match(actual: str, expected: str) -> None:
    assert not stdout_matches(actual, expected)
    assert not stdout_matches(f"1 {actual}\n", f"1 {expected}\n")


@pytest.mark.parametrize(
    ("actual", "expected"),
    [
        ("1000000007", "1000000007"),
        ("-12", "-12"),
        (str(10**400), str(10**400)),  # big integers compare exactly, no OverflowError
        ("3", "3.000000"),  # a float is expected: tolerance 1e-6
        ("2.5000004", "2.5"),
        ("1e400", "1.0e400"),  # the same value past float range
        ("1.0000000001e400", "1e400"),  # relative error 1e-10
        ("0.1234567", "0.12345670"),
        ("inf", "inf"),  # identical text
    ],
)
def test_stdout_equal_numbers_match(actual: str, expected: str) -> None:
    assert stdout_matches(actual, expected)


def test_values_equal_compares_integers_exactly() -> None:
    assert not values_equal(10**9 + 8, 10**9 + 7)
    assert not values_equal(2**70 + 1, 2**70)
    assert values_equal(10**400, 10**400)  # used to raise OverflowError (a reward error)
    assert not values_equal(10**400 + 1, 10**400)
    assert not values_equal(10**400, 1.5)  # a float expected, a huge int: no crash
    assert not values_equal(1.5, 10**400)
    assert not values_equal(3.0000001, 3)  # an integer expected: exact
    assert values_equal(3, 3.0000001)  # a float expected: tolerance
    assert values_equal([1, [2, 10**30]], [1, [2, 10**30]])
    assert not values_equal([1, [2, 10**30 + 1]], [1, [2, 10**30]])


def test_call_results_past_float_range_are_not_infinite() -> None:
    # JSON numbers past float range became inf on both sides and compared equal.
    (case,) = parse_test_cases(
        [{"input": "1", "output": "2e400", "testtype": "functional", "fn_name": "f"}]
    )
    assert isinstance(case, CallCase)
    assert not call_result_matches("1e400", case.expected)
    assert call_result_matches("2e400", case.expected)
    assert call_result_matches("2.0e400", case.expected)
    assert not call_result_matches("Infinity", case.expected)
    assert not call_result_matches("1e400", float("inf"))
    assert call_result_matches(str(10**400), 10**400)
    assert not call_result_matches(str(10**400 + 1), 10**400)
    assert not call_result_matches("1000000008", [1000000007])


def test_call_arguments_past_float_range_still_reach_the_program() -> None:
    (case,) = parse_test_cases(
        [{"input": "1e400\n[2]", "output": "1", "testtype": "functional", "fn_name": "f"}]
    )
    assert isinstance(case, CallCase)
    assert json.loads(to_json(case.args)) == [float("inf"), [2]]  # as json.loads read it
