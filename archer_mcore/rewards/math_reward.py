"""Math reward: extract the final answer and check it against the ground truth.

Equivalence is decided by math-verify (sympy), after a fast path for answers that are
plain numbers or identical strings. math-verify's own timeouts rely on SIGALRM, which
only works in a process's main thread, so they are switched off here
(`parsing_timeout=None`, `timeout_seconds=None`): the time limit is enforced from
outside, by running `score_math` in a killable worker process
(`archer_mcore.rewards.process_pool.KillablePool`). Call it directly only where
hanging is acceptable (tests, offline evaluation in the main thread).

Answer form (`strict_answer_form`, on by default; config
`rewards.math_strict_answer_form`): when a reference answer is a plain number, the
response's answer must be one too, in simplified form: an integer or a decimal
(optional sign, thousands commas, a scientific exponent of at most three digits), or
a fraction in lowest terms with a denominator above 1 (`3/4`, `\\frac{3}{4}`,
`-\\frac{3}{4}`), optionally followed by a unit (`\\text{ cm}`, `^\\circ`, `\\%`). No
operators: a response that restates the question (`\\boxed{0 - 9 - 0}` for -9) or
leaves the arithmetic undone (`12/2`, `\\frac{6}{8}`) fails with reason
`answer_form`, whatever its value. A fractional reference such as 3/4 accepts `3/4`,
`\\frac{3}{4}` and the exact decimal `0.75` (all simplified numbers); an integer
reference accepts `6` or `6.0`. References that are not plain numbers (`\\sqrt{2}`,
`x^2+1`, intervals) are judged on equivalence alone.

Equations (`false_equation`): an answer that is an equation or a chain `a = b = c` in
which two or more sides are constants (no variable, no undefined function) is wrong
unless those constants are all equal: `\\sqrt{3} = \\sqrt{2}` and `2+2=5` are false
claims, which math-verify would otherwise judge by their right-hand side alone.
`\\frac{1}{2} = 0.5` (true) and `x = 8` (a variable on the left) are judged as before.
"""

from __future__ import annotations

import logging
import math
import re
from fractions import Fraction
from typing import Any

from archer_mcore.rewards.math_extract import extract_final_answer, split_equation
from archer_mcore.rewards.types import (
    ANSWER_FORM,
    BAD_GROUND_TRUTH,
    NO_ANSWER,
    WRONG_ANSWER,
    RewardResult,
)

_NUMBER = re.compile(r"^[+-]?(\d+(\.\d*)?|\.\d+)([eE][+-]?\d+)?$")
_THOUSANDS = re.compile(r"^[+-]?\d{1,3}(,\d{3})+(\.\d+)?$")


def _normalize(answer: str) -> str:
    """Cheap textual normalisation: no spaces, no `$`, no trailing period, no \\left/\\right."""
    s = answer.strip().strip("$").strip()
    s = s.replace("\\left", "").replace("\\right", "").replace("\\!", "")
    s = s.replace("\\dfrac", "\\frac").replace("\\tfrac", "\\frac")
    s = re.sub(r"\s+", "", s).replace("\u2212", "-")  # U+2212, the typographic minus
    return s.rstrip(".")


def _as_number(answer: str) -> Fraction | None:
    """The exact value of a plain decimal/integer/`a/b` answer (commas allowed), else None."""
    s = _normalize(answer)
    if _THOUSANDS.match(s):
        s = s.replace(",", "")
    frac = re.match(r"^([+-]?\d+)/(\d+)$", s) or re.match(r"^([+-]?)\\frac\{(\d+)\}\{(\d+)\}$", s)
    try:
        if frac is not None and len(frac.groups()) == 2:
            return Fraction(int(frac.group(1)), int(frac.group(2)))
        if frac is not None:
            sign = -1 if frac.group(1) == "-" else 1
            return sign * Fraction(int(frac.group(2)), int(frac.group(3)))
        if _NUMBER.match(s):
            return Fraction(s)
    except (ValueError, ZeroDivisionError):
        return None
    return None


_SIMPLE_DECIMAL = re.compile(r"^[+-]?(\d+|\d{1,3}(,\d{3})+)?(\.\d+)?([eE][+-]?\d{1,3})?$")
_SIMPLE_FRACTION = re.compile(
    r"^[+-]?(?:(?P<n1>\d+)/(?P<d1>\d+)"
    r"|\\frac\{(?P<n2>[+-]?\d+)\}\{(?P<d2>\d+)\}"
    r"|\\frac(?P<n3>\d)(?P<d3>\d))$"
)


# A unit after the number: "18\\text{ dollars}", "30^\\circ", "50\\%" (spaces removed).
_TEXT_UNIT = re.compile(r"\\(?:text|mbox|mathrm)\{[A-Za-z.]*+\}")
_TEXT_UNIT_COMMANDS = ("\\text", "\\mbox", "\\mathrm")
_CIRCLE_UNITS = ("^{\\circ}", "^\\circ}", "^{\\circ", "^\\circ")


def _unit_at_end(s: str, end: int) -> int:
    """Length of the unit that ends at s[:end] ("\\text{cm}", "^\\circ", "\\%", "%"), or 0."""
    if s.endswith("%", 0, end):
        return 2 if s.endswith("\\%", 0, end) else 1
    for unit in _CIRCLE_UNITS:
        if s.endswith(unit, 0, end):
            return len(unit)
    if s.endswith("}", 0, end):
        brace = s.rfind("{", 0, end)
        for command in _TEXT_UNIT_COMMANDS:
            start = brace - len(command)
            if start >= 0 and s.startswith(command, start) and _TEXT_UNIT.fullmatch(s, start, end):
                return end - start
    return 0


def _strip_unit_suffix(s: str) -> str:
    """`s` without the units at its end ("18\\text{dollars}" -> "18"), removed right to left.

    The same units as the regex "(?:\\\\(?:text|mbox|mathrm)\\{[A-Za-z.]*\\}|\\^\\{?\\\\circ\\}?
    |\\\\?%)+$" matched, without its quadratic search ("%" * 40k + "x": 57 s): each
    character is looked at a bounded number of times.
    """
    end = len(s)
    while end and (size := _unit_at_end(s, end)):
        end -= size
    return s[:end]


def is_simplified_number(answer: str) -> bool:
    """True if `answer` is a plain number in simplified form (see the module docstring):
    "-9", "1,000", "0.75", "6.02e23", "3/4", "-\\frac{3}{4}", also with a unit after it
    ("18\\text{ dollars}", "30^\\circ", "50\\%"); not "0-9-0", "12/2", "\\frac{6}{8}",
    "1e9999", "x=3"."""
    s = _strip_unit_suffix(_normalize(answer))
    if _SIMPLE_DECIMAL.match(s):
        return any(ch.isdigit() for ch in s.split("e")[0].split("E")[0])
    m = _SIMPLE_FRACTION.match(s)
    if m is None:
        return False
    try:
        num = int(m.group("n1") or m.group("n2") or m.group("n3"))
        den = int(m.group("d1") or m.group("d2") or m.group("d3"))
    except ValueError:  # more digits than int() accepts from text
        return False
    if m.group("n2") and s.startswith(("-", "+")) and m.group("n2")[0] in "+-":
        return False  # a sign both outside and inside: "-\frac{-3}{4}"
    return den > 1 and math.gcd(num, den) == 1


def _quiet_math_verify() -> None:
    """math-verify warns once per process that its timeouts are off (we set them off:
    the worker process is the time limit); call before its first parse or verify."""
    logging.getLogger("math_verify").setLevel(logging.ERROR)


def _math_verify_equal(pred: str, gold: str) -> bool:
    from math_verify import parse, verify  # imported lazily: slow first import

    _quiet_math_verify()
    gold_text = gold if "\\boxed" in gold or "$" in gold else f"${gold}$"
    gold_parsed = parse(gold_text, parsing_timeout=None)  # type: ignore[arg-type]
    pred_parsed = parse(f"${pred}$", parsing_timeout=None)  # type: ignore[arg-type]
    if not gold_parsed or not pred_parsed:
        return False
    return bool(verify(gold_parsed, pred_parsed, timeout_seconds=None))


#: Distinct sides an equation chain may have; a longer chain is wrong (`false_equation`).
MAX_EQUATION_SIDES = 16


def _constant_side(side: str) -> Any | None:
    """math-verify's parse of `side` when it is a constant (no free symbol, no undefined
    function such as `f(2)`), else None (a variable, or not parsed)."""
    from math_verify import parse
    from sympy import Basic
    from sympy.core.function import AppliedUndef

    _quiet_math_verify()
    parsed = parse(f"${side}$", parsing_timeout=None)  # type: ignore[arg-type]
    if not parsed or not isinstance(parsed[0], Basic):
        return None
    expr = parsed[0]
    if expr.free_symbols or expr.atoms(AppliedUndef):
        return None
    return parsed


def false_equation(answer: str) -> bool:
    """True when `answer` is an equation (chain) whose constant sides are not all equal:
    `\\sqrt{3} = \\sqrt{2}`, `2+2=5`, `1 = 2 = x`. Sides with a variable do not count,
    so `x = 8` is not false; nor is `\\frac{1}{2} = 0.5`. A chain of more than
    MAX_EQUATION_SIDES distinct sides counts as false (each side is parsed by sympy:
    the cost stays bounded whatever the response)."""
    sides = list(dict.fromkeys(split_equation(answer)))  # distinct sides, in order
    if len(sides) > MAX_EQUATION_SIDES:
        return True  # not an answer; and each side costs a sympy parse
    if len(sides) < 2:
        return False
    constants = [(side, parsed) for side in sides if (parsed := _constant_side(side))]
    if len(constants) < 2:
        return False
    first, first_parsed = constants[0]
    return not all(
        _sides_equal(first, first_parsed, side, parsed) for side, parsed in constants[1:]
    )


def _sides_equal(a: str, a_parsed: Any, b: str, b_parsed: Any) -> bool:
    from math_verify import verify

    a_num, b_num = _as_number(a), _as_number(b)
    if a_num is not None and b_num is not None:
        return a_num == b_num
    return bool(verify(a_parsed, b_parsed, timeout_seconds=None))


def answers_equivalent(pred: str, gold: str) -> bool:
    """True when the answer `pred` equals the reference `gold` mathematically."""
    if _normalize(pred) == _normalize(gold):
        return True
    pred_num, gold_num = _as_number(pred), _as_number(gold)
    if pred_num is not None and gold_num is not None:
        return pred_num == gold_num
    return _math_verify_equal(pred, gold)


def _gold_answers(ground_truth: Any) -> list[str]:
    if isinstance(ground_truth, (int, float)) and not isinstance(ground_truth, bool):
        return [str(ground_truth)]
    if isinstance(ground_truth, str):
        return [ground_truth]
    if isinstance(ground_truth, (list, tuple)) and ground_truth:
        return [str(g) for g in ground_truth]
    raise ValueError(
        f"math ground truth must be a string or a list of strings, got {ground_truth!r}"
    )


def score_math(response: str, ground_truth: Any, strict_answer_form: bool = True) -> RewardResult:
    """Score a math response: correct iff its final answer matches any reference answer.

    ground_truth: a reference answer string, a number, or a list of acceptable answers;
    a `\\boxed{}` inside it is unwrapped.
    strict_answer_form: against a plain-number reference, accept only a simplified
    number (see the module docstring); failing that is reason `answer_form`.
    """
    try:
        golds = _gold_answers(ground_truth)
    except ValueError as err:
        return RewardResult.failed(BAD_GROUND_TRUTH, str(err))
    answer = extract_final_answer(response)
    if answer is None:
        return RewardResult.failed(NO_ANSWER, "no \\boxed{} or 'answer is' in the response")
    if false_equation(answer):
        return RewardResult.failed(WRONG_ANSWER, detail=f"{answer} (a false equation)")
    form_failed = False
    for gold in golds:
        gold_answer = (extract_final_answer(gold) if "\\boxed" in gold else gold) or gold
        numeric_gold = _as_number(gold_answer) is not None
        if strict_answer_form and numeric_gold and not is_simplified_number(answer):
            form_failed = True  # checked first: cheap, and no huge exponent is evaluated
            continue
        if answers_equivalent(answer, gold_answer):
            return RewardResult.passed(detail=answer)
    if form_failed:
        return RewardResult.failed(ANSWER_FORM, detail=f"{answer} (not a simplified number)")
    return RewardResult.failed(WRONG_ANSWER, detail=answer)
