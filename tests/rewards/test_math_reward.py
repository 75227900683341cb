"""Math equivalence and scoring, called directly (main thread, no pool)."""

from __future__ import annotations

import pytest

from archer_mcore.rewards.math_reward import answers_equivalent, score_math
from archer_mcore.rewards.types import BAD_GROUND_TRUTH, NO_ANSWER, WRONG_ANSWER


@pytest.mark.parametrize(
    ("pred", "gold"),
    [
        ("6", "6"),
        ("6.0", "6"),  # same number
        ("1,000", "1000"),  # thousands separator
        ("0.5", "\\frac{1}{2}"),  # 1/2 = 0.5
        ("\\dfrac{1}{2}", "\\frac12"),
        ("-\\frac{3}{4}", "-0.75"),
        ("1+x^2", "x^2+1"),  # commuted sum: needs sympy (math-verify)
        ("\\sqrt{8}", "2\\sqrt{2}"),  # sqrt(8) = 2 sqrt(2)
    ],
)
def test_equivalent(pred: str, gold: str) -> None:
    assert answers_equivalent(pred, gold)


@pytest.mark.parametrize(
    ("pred", "gold"),
    [("7", "6"), ("0.51", "\\frac{1}{2}"), ("x^2-1", "x^2+1"), ("\\sqrt{3}", "2")],
)
def test_not_equivalent(pred: str, gold: str) -> None:
    assert not answers_equivalent(pred, gold)


def test_score_math_verdicts() -> None:
    ok = score_math("3 + 4 * 2 - 5: 4 * 2 = 8, 3 + 8 = 11, 11 - 5 = 6. \\boxed{6}", "6")
    assert (ok.score, ok.correct, ok.fraction_passed, ok.failure) == (1.0, True, 1.0, None)
    wrong = score_math("\\boxed{7}", "6")
    assert (wrong.score, wrong.correct, wrong.failure, wrong.detail) == (
        0.0,
        False,
        WRONG_ANSWER,
        "7",
    )
    none = score_math("I think it is six", "6")
    assert none.failure == NO_ANSWER and none.score == 0.0
    # a boxed reference is unwrapped; a list accepts any of its answers; numbers are fine
    assert score_math("The answer is 12.", "\\boxed{12}").correct
    assert score_math("\\boxed{b}", ["a", "b"]).correct
    assert score_math("\\boxed{3}", 3).correct
    assert score_math("\\boxed{3}", None).failure == BAD_GROUND_TRUTH
