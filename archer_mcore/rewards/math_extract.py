"""Final-answer extraction from a math response (pure string functions, no sympy).

Two forms are recognised, in this order of preference:
  1. the last `\\boxed{...}` (or `\\fbox{...}`), braces nested to any depth, escaped
     braces `\\{ \\}` not counted; also the brace-less `\\boxed 5`;
  2. the last "answer is X" / "final answer: X" / "Answer: X" phrase, X up to the end
     of its line, with surrounding `$...$`, `\\(...\\)` and a trailing period removed.
"""

from __future__ import annotations

import re

# "answer is" / "final answer:" / "answer =": the phrase only. Possessive quantifiers
# (no backtracking); what follows is read by `_answer_is_matches` without a regex (the
# former "\s*:?\s*([^\n]+)" tail tried every split of a whitespace run between its
# two "\s*": quadratic, 17 s on "answer is" + 40k newlines).
_ANSWER_IS = re.compile(r"(?:final\s++answer|answer)\s*+(?:is|:|=)", re.IGNORECASE)
_WHITESPACE = re.compile(r"\s*+")


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


def _answer_is_matches(text: str) -> list[str]:
    """The text after each "answer is" phrase: from the first non-blank character after
    it (and an optional ":") to the end of that line; nothing when only blanks follow
    (the regex this replaces then backtracked to a blank or a lone ":"). Phrases are found left to right
    and a match ends at its line's end, so a second phrase on the same line is part of
    the first's answer (as with the regex this replaces). Linear in len(text)."""
    found: list[str] = []
    pos = 0
    while m := _ANSWER_IS.search(text, pos):
        j = _WHITESPACE.match(text, m.end()).end()  # type: ignore[union-attr]
        if text.startswith(":", j):
            j = _WHITESPACE.match(text, j + 1).end()  # type: ignore[union-attr]
        if j >= len(text):
            break
        eol = text.find("\n", j)
        eol = len(text) if eol < 0 else eol
        found.append(text[j:eol])
        pos = max(eol, m.end())
    return found


def answer_is_phrase(text: str) -> str | None:
    """X from the last "answer is X" / "answer: X" phrase, delimiters stripped; or None.

    X is a leading `$...$` / `\\(...\\)` span if there is one, else the text up to the
    first ", ", ";", sentence end or explanation word ("because", "since", ...).
    """
    for ans in reversed(_answer_is_matches(text)):
        candidate = _strip_math_delimiters(_answer_span(ans))
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


_OPENERS, _CLOSERS = "{([", "})]"
#: Characters that make a following or preceding "=" part of another relation.
_RELATION_NEIGHBOURS = frozenset("<>!:=")


def split_equation(answer: str) -> list[str]:
    """The sides of `answer` as an equation (chain): `a = b = c` -> ["a", "b", "c"].

    Splits at every "=" outside braces, parentheses and brackets (escaped `\\{ \\}` count
    too, so a set `\\{x = 1\\}` or a `\\text{x=1}` is not split), except where it is part
    of "==", "<=", ">=", "!=" or ":=". An answer without such an "=", or with an empty
    side, is returned whole: [answer]. One pass: time linear in len(answer).
    """
    depth, start, sides = 0, 0, []
    for i, ch in enumerate(answer):
        if ch in _OPENERS:
            depth += 1
        elif ch in _CLOSERS:
            depth = max(0, depth - 1)
        elif ch == "=" and depth == 0:
            if (
                answer[i - 1 : i] in _RELATION_NEIGHBOURS
                or answer[i + 1 : i + 2] in _RELATION_NEIGHBOURS
            ):
                continue
            sides.append(answer[start:i].strip())
            start = i + 1
    if not sides:
        return [answer]
    sides.append(answer[start:].strip())
    return [answer] if any(not side for side in sides) else sides
