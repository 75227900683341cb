"""Final-answer extraction: expected strings are read off the inputs by hand."""

from __future__ import annotations

import threading
import time

import pytest

from archer_mcore.rewards.math_extract import (
    _strip_math_delimiters,
    answer_is_phrase,
    extract_final_answer,
    last_boxed,
    split_equation,
)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("so 3 + 4 * 2 - 5 = 6. \\boxed{6}", "6"),
        # nested braces: the group closes at the brace matching the first {
        ("\\boxed{\\frac{1}{2}}", "\\frac{1}{2}"),
        ("x = \\boxed{\\sqrt{\\frac{a^{2}}{b}}} done", "\\sqrt{\\frac{a^{2}}{b}}"),
        # the last box wins
        ("first \\boxed{1}, then \\boxed{2}", "2"),
        # escaped braces are literal characters, not grouping
        ("\\boxed{\\{1, 2\\}}", "\\{1, 2\\}"),
        ("\\fbox{7}", "7"),
        ("\\boxed 5 is it", "5"),
        ("$\\boxed {  12 }$", "12"),
    ],
)
def test_last_boxed(text: str, expected: str) -> None:
    assert last_boxed(text) == expected


@pytest.mark.parametrize("text", ["no box here", "\\boxed{unclosed {", "\\boxedfoo{3}"])
def test_last_boxed_absent(text: str) -> None:
    assert last_boxed(text) is None


def test_unbalanced_last_box_falls_back_to_an_earlier_one() -> None:
    assert last_boxed("\\boxed{4} and then \\boxed{5") == "4"


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("Thus the answer is 42.", "42"),
        ("The final answer is $\\frac{3}{4}$.", "\\frac{3}{4}"),
        ("Answer: 3.5", "3.5"),
        ("the answer is: \\(x+1\\)", "x+1"),
        ("The answer is 1.\nLater: the answer is 2.", "2"),
        ("Final answer: $\\boxed{9}$", "9"),
        # the answer ends at a comma, a sentence end or an explanation word
        ("The answer is 6, since 3 + 3 = 6.", "6"),
        ("The answer is 6 because 2 * 3 = 6", "6"),
        ("So the answer is 2.5. Done.", "2.5"),
        ("The answer is $x = 3$, clearly", "x = 3"),
        ("The answer is \\(\\frac{1}{2}\\) since", "\\frac{1}{2}"),
    ],
)
def test_answer_is_phrase(text: str, expected: str) -> None:
    assert answer_is_phrase(text) == expected


def test_boxed_preferred_over_answer_is() -> None:
    assert extract_final_answer("The answer is 3. Actually \\boxed{4}") == "4"
    assert extract_final_answer("The answer is 3.") == "3"
    assert extract_final_answer("I don't know") is None
    # an empty box is not an answer; the phrase is used instead
    assert extract_final_answer("\\boxed{} so the answer is 8") == "8"


def _best_of(fn, text: str, repeats: int = 2) -> float:  # type: ignore[no-untyped-def]
    """Least CPU time of this thread over `repeats` calls (CPU, not wall-clock, time:
    other processes loading the machine do not inflate it)."""
    best = float("inf")
    for _ in range(repeats):
        start = time.thread_time()
        fn(text)
        best = min(best, time.thread_time() - start)
    return best


def _finishes_within(fn, text: str, seconds: float) -> bool:  # type: ignore[no-untyped-def]
    """Run fn(text) in a daemon thread; False if it is still running after `seconds`
    (the quadratic scan took minutes on 30k boxes: fail fast instead of hanging)."""
    t = threading.Thread(target=fn, args=(text,), daemon=True)
    t.start()
    t.join(seconds)
    return not t.is_alive()


@pytest.mark.parametrize(
    ("fn", "make"),
    [
        # unclosed boxes: each used to scan to the end of the text
        (extract_final_answer, lambda n: "\\boxed{" * n),
        (extract_final_answer, lambda n: "\\boxed{\\{" * n),  # with escaped braces
        # nested math delimiters: one pair per pass, each pass copying the string
        (_strip_math_delimiters, lambda n: "$" * n + "5" + "$" * n),
    ],
)
def test_extraction_is_linear_in_the_response_length(fn, make) -> None:  # type: ignore[no-untyped-def]
    small, big = make(30_000), make(300_000)
    # A linear pass over 210k characters is well under a second even on a loaded
    # machine; the quadratic one made 30k * 105k = 3e9 steps.
    assert _finishes_within(fn, small, 10.0)
    assert fn(small) in (None, "5")
    t_small = _best_of(fn, small)
    t_big = _best_of(fn, big)
    # 10x the input: linear is ~10x the time; quadratic would be 100x. Generous margin.
    assert t_big < 30 * t_small + 0.05, (t_small, t_big)


def test_unclosed_boxes_do_not_hide_a_closed_one() -> None:
    assert extract_final_answer("\\boxed{7} then " + "\\boxed{" * 30_000) == "7"
    assert extract_final_answer("\\boxed{" * 30_000 + "\\boxed{42}") == "42"
    # the last box closes (the unclosed ones before it are nested in nothing)
    assert last_boxed("\\boxed{" * 3 + "x}") == "x"
    assert last_boxed("\\boxed{a \\} b}") == "a \\} b"  # escaped brace kept literal


@pytest.mark.parametrize(
    ("answer", "sides"),
    [
        ("\\sqrt{3} = \\sqrt{2}", ["\\sqrt{3}", "\\sqrt{2}"]),
        ("a = b = c", ["a", "b", "c"]),
        ("2+2=5", ["2+2", "5"]),
        ("x \\leq 3", ["x \\leq 3"]),
        ("a <= b", ["a <= b"]),
        ("a >= b", ["a >= b"]),
        ("a == b", ["a == b"]),
        ("a != b", ["a != b"]),
        ("x := 3", ["x := 3"]),
        ("\\{x = 1\\}", ["\\{x = 1\\}"]),  # a set
        ("\\text{x=1}", ["\\text{x=1}"]),
        ("f(x=1) = 2", ["f(x=1)", "2"]),
        ("= 5", ["= 5"]),  # an empty side: not an equation
        ("5 =", ["5 ="]),
    ],
)
def test_split_equation(answer: str, sides: list[str]) -> None:
    assert split_equation(answer) == sides
