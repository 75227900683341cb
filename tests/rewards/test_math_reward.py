"""Math equivalence and scoring, called directly (main thread, no pool)."""

from __future__ import annotations

import pytest

from archer_mcore.rewards.math_reward import answers_equivalent, score_math
from archer_mcore.rewards.types import ANSWER_FORM, BAD_GROUND_TRUTH, NO_ANSWER, WRONG_ANSWER


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


# ---------------------------------------------------------------- answer form (item 7)
@pytest.mark.parametrize(
    ("pred", "gold"),
    [
        ("-9", "-9"),
        ("6.0", "6"),  # a decimal is a plain number
        ("1,000", "1000"),
        ("3/4", "3/4"),  # a fraction in lowest terms is the simplified form of 3/4
        ("\\frac{3}{4}", "3/4"),
        ("0.75", "3/4"),  # the exact decimal of 3/4
        ("-\\frac{3}{4}", "-0.75"),
        ("\\frac{-3}{4}", "-3/4"),
        # a unit after the number is not an operator (math-verify drops it)
        ("18 \\text{ dollars}", "18"),
        ("30^\\circ", "30"),
        ("50\\%", "50"),
    ],
)
def test_simplified_numbers_pass_the_strict_form(pred: str, gold: str) -> None:
    assert score_math(f"\\boxed{{{pred}}}", gold).correct


@pytest.mark.parametrize(
    ("pred", "gold"),
    [
        ("0 - 9 - 0", "-9"),  # the question restated: equals -9, not an answer
        ("3 + 4 * 2 - 5", "6"),
        ("12/2", "6"),  # arithmetic left undone
        ("\\frac{6}{8}", "3/4"),  # not in lowest terms
        ("6/8", "0.75"),
        ("1 - \\frac{1}{4}", "3/4"),
        ("x = 6", "6"),
        ("7 - 1 \\text{ cm}", "6"),  # a unit does not excuse an expression
    ],
)
def test_unsimplified_answers_fail_the_strict_form_and_pass_relaxed(pred: str, gold: str) -> None:
    strict = score_math(f"\\boxed{{{pred}}}", gold)
    assert (strict.correct, strict.failure) == (False, ANSWER_FORM), strict
    # each is mathematically equal to its reference: the relaxed rule accepts it
    assert score_math(f"\\boxed{{{pred}}}", gold, strict_answer_form=False).correct


def test_strict_form_applies_to_numeric_references_only() -> None:
    # a symbolic reference is judged on equivalence alone: sqrt(8) = 2 sqrt(2)
    assert score_math("\\boxed{\\sqrt{8}}", "2\\sqrt{2}").correct
    # a wrong plain number is a wrong answer, not a form failure
    assert score_math("\\boxed{7}", "6").failure == WRONG_ANSWER
    # a pathological exponent fails the form check at once (no 10**999999999 is built)
    assert score_math("\\boxed{1e999999999}", "5").failure == ANSWER_FORM


def test_demo_arithmetic_task_scores_its_solutions_and_rejects_restatements() -> None:
    from archer_mcore.data.synthetic import ArithmeticTaskConfig, generate_arithmetic_rows

    rows = generate_arithmetic_rows(200, ArithmeticTaskConfig(min_operands=3), seed=5)
    assert any(int(r["reward_model"]["ground_truth"]) < 0 for r in rows)  # negatives seen
    for row in rows:
        gold = row["reward_model"]["ground_truth"]
        solution = row["extra_info"]["solution"]  # "4 * 2 = 8. ... \boxed{6}"
        assert score_math(solution, gold).correct, (solution, gold)
        restated = f"\\boxed{{{row['extra_info']['expression']}}}"
        assert score_math(restated, gold).failure == ANSWER_FORM, (restated, gold)


# --------------------------------------------- a false equation is wrong (issue 22, item 11)
# When two or more sides of the boxed equation are constants they must be equal; the
# verifier used to compare only the right-hand side with the reference.
@pytest.mark.parametrize(
    ("response", "gold"),
    [
        (r"\boxed{\sqrt{3} = \sqrt{2}}", r"\sqrt{2}"),  # sqrt(3) != sqrt(2)
        (r"\boxed{2+2=5}", "5"),  # 4 != 5
        (r"\boxed{1 = 2 = \sqrt{2}}", r"\sqrt{2}"),  # a chain: 1 != 2
        (r"\boxed{\sqrt{2} = \sqrt{2} = 3}", "3"),  # the last link is false
        (r"\boxed{\frac{3}{2} = 1.5 = 2}", "2"),
        (r"\boxed{\pi = 3}", "3"),
        (r"\boxed{2^{10} = 1000}", "1000"),  # 1024 != 1000
        (r"The final answer is $7 - 2 = 6$.", "6"),  # the "answer is" form too
        ("\\boxed{" + "=".join(map(str, range(1, 40))) + "}", "39"),  # too long a chain
    ],
)
@pytest.mark.parametrize("strict", [True, False])
def test_false_constant_equations_are_wrong(response: str, gold: str, strict: bool) -> None:
    r = score_math(response, gold, strict_answer_form=strict)
    assert (r.correct, r.failure) == (False, WRONG_ANSWER), r


@pytest.mark.parametrize(
    ("response", "gold"),
    [
        (r"\boxed{\frac{1}{2}=0.5}", "0.5"),  # true: 1/2 = 0.5
        (r"\boxed{2+2=4}", "4"),
        (r"\boxed{\sqrt{4} = 2}", "2"),
        (r"\boxed{x = 8}", "8"),  # a variable on the left: an answer, not a claim
        (r"\boxed{x = \sqrt{2}}", r"\sqrt{2}"),
        (r"\boxed{y = 2x + 1}", "2x+1"),
        (r"\boxed{a \leq 3}", r"a \leq 3"),  # not an equation
    ],
)
def test_true_equations_and_assignments_still_score(response: str, gold: str) -> None:
    r = score_math(response, gold, strict_answer_form=False)
    assert r.correct, r
