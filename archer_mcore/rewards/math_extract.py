"""Final-answer extraction from a math response (pure string functions, no sympy).

Two forms are recognised, in this order of preference:
  1. the last `\\boxed{...}` (or `\\fbox{...}`), braces nested to any depth, escaped
     braces `\\{ \\}` not counted; also the brace-less `\\boxed 5`;
  2. the last "answer is X" / "final answer: X" / "Answer: X" phrase, X up to the end
     of its line, with surrounding `$...$`, `\\(...\\)` and a trailing period removed.
"""

from __future__ import annotations

import re

_ANSWER_IS = re.compile(
    r"(?:final\s+answer|answer)\s*(?:is|:|=)\s*:?\s*(?P<ans>[^\n]+)", re.IGNORECASE
)


_BOX = re.compile(r"\\(?:boxed|fbox)")
_BRACE_OR_ESCAPE = re.compile(r"\\.|[{}]", re.DOTALL)
_BLANKS = re.compile(r"[ \t]*")
_BARE_ANSWER = re.compile(r"[^\s$]+")


def _matching_braces(text: str) -> dict[int, int]:
    """Index of each `{` -> index of its matching `}` (unmatched ones absent), in one
    pass; `\\{` and `\\}` are escaped (literal) braces and not counted."""
    stack: list[int] = []
    matches: dict[int, int] = {}
    for m in _BRACE_OR_ESCAPE.finditer(text):
        ch = m.group()
        if ch == "{":
            stack.append(m.start())
        elif ch == "}" and stack:
            matches[stack.pop()] = m.start()
    return matches


def last_boxed(text: str) -> str | None:
    """The contents of the last well-formed `\\boxed{...}` / `\\fbox{...}` in `text`.

    `\\boxed 5` (no braces) yields "5". Returns None if there is none. Time is linear
    in len(text) (the braces are matched in one pass), however many boxes are unclosed.
    """
    starts = [m.end() for m in _BOX.finditer(text)]
    if not starts:
        return None
    matches = _matching_braces(text)
    for rest in reversed(starts):
        if rest < len(text) and text[rest].isalpha():
            continue  # a longer command such as \boxedfoo
        j = _BLANKS.match(text, rest).end()  # type: ignore[union-attr]
        if j < len(text) and text[j] == "{":
            close = matches.get(j)
            if close is not None:
                return text[j + 1 : close].strip()
        elif j > rest and j < len(text):  # "\boxed 5": up to whitespace or `$`
            m = _BARE_ANSWER.match(text, j)
            if m:
                return m.group(0)
    return None


def _strip_math_delimiters(answer: str) -> str:
    """Remove enclosing `$...$`, `$$...$$`, `\\(...\\)`, `\\[...\\]` (repeatedly) and a
    trailing period. Works on indices, so linear even for "$$$$...$$$$"."""
    lo, hi = 0, len(answer)

    def trim() -> None:
        nonlocal lo, hi
        while lo < hi and answer[lo].isspace():
            lo += 1
        while hi > lo and answer[hi - 1].isspace():
            hi -= 1

    trim()
    changed = True
    while changed and lo < hi:
        changed = False
        for left, right in (("$$", "$$"), ("$", "$"), ("\\(", "\\)"), ("\\[", "\\]")):
            if (
                hi - lo >= len(left) + len(right)
                and answer.startswith(left, lo, hi)
                and answer.endswith(right, lo, hi)
            ):
                lo, hi = lo + len(left), hi - len(right)
                trim()
                changed = True
        if answer.endswith((".", "。"), lo, hi) and not answer.endswith("..", lo, hi):
            hi -= 1
            trim()
            changed = True
    return answer[lo:hi]


_MATH_SPANS = (("$$", "$$"), ("$", "$"), ("\\(", "\\)"), ("\\[", "\\]"))
# Where a plain-text answer ends: ", " / "; " / a sentence end / an explanation word.
_ANSWER_END = re.compile(r",\s|;|\.\s|\s(?:because|since|as|which|so|and|from|given)\b")


def _answer_span(rest: str) -> str:
    """The answer at the start of `rest`: a leading math span, else text up to its end."""
    rest = rest.strip()
    for left, right in _MATH_SPANS:
        if rest.startswith(left):
            close = rest.find(right, len(left))
            if close > 0:
                return rest[: close + len(right)]
    if "\\boxed" in rest or "\\fbox" in rest:
        return rest
    m = _ANSWER_END.search(rest)
    return rest[: m.start()] if m else rest


def answer_is_phrase(text: str) -> str | None:
    """X from the last "answer is X" / "answer: X" phrase, delimiters stripped; or None.

    X is a leading `$...$` / `\\(...\\)` span if there is one, else the text up to the
    first ", ", ";", sentence end or explanation word ("because", "since", ...).
    """
    matches = list(_ANSWER_IS.finditer(text))
    for m in reversed(matches):
        candidate = _strip_math_delimiters(_answer_span(m.group("ans")))
        inner = last_boxed(candidate)
        if inner is not None:
            return inner
        if candidate:
            return candidate
    return None


def extract_final_answer(text: str) -> str | None:
    """The response's final answer: the last boxed answer, else the last "answer is"."""
    boxed = last_boxed(text)
    if boxed is not None and boxed != "":
        return boxed
    return answer_is_phrase(text)
