"""Final-answer extraction: expected strings are read off the inputs by hand."""

from __future__ import annotations

import pytest

from archer_mcore.rewards.math_extract import answer_is_phrase, extract_final_answer, last_boxed


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
