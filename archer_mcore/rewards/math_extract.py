"""Final-answer extraction from a math response (pure string functions, no sympy).

Two forms are recognised, in this order of preference:
  1. the last `\\boxed{...}` (or `\\fbox{...}`), braces nested to any depth, escaped
     braces `\\{ \\}` not counted; also the brace-less `\\boxed 5`;
  2. the last "answer is X" / "final answer: X" / "Answer: X" phrase, X up to the end
     of its line, with surrounding `$...$`, `\\(...\\)` and a trailing period removed.
"""

from __future__ import annotations

import re

_BOX_COMMANDS = ("\\boxed", "\\fbox")
_ANSWER_IS = re.compile(
    r"(?:final\s+answer|answer)\s*(?:is|:|=)\s*:?\s*(?P<ans>[^\n]+)", re.IGNORECASE
)


def _braced_group(text: str, open_index: int) -> str | None:
    """Contents of the `{...}` group whose `{` is at `open_index`; None if unbalanced."""
    depth = 0
    i = open_index
    while i < len(text):
        ch = text[i]
        if ch == "\\":  # skip the escaped character (\{ and \} are literal braces)
            i += 2
            continue
        if ch == "{":
            depth += 1
        elif ch == "}":
            depth -= 1
            if depth == 0:
                return text[open_index + 1 : i]
        i += 1
    return None


def last_boxed(text: str) -> str | None:
    """The contents of the last well-formed `\\boxed{...}` / `\\fbox{...}` in `text`.

    `\\boxed 5` (no braces) yields "5". Returns None if there is none.
    """
    positions = sorted(
        (m.start(), cmd) for cmd in _BOX_COMMANDS for m in re.finditer(re.escape(cmd), text)
    )
    for start, cmd in reversed(positions):
        rest = start + len(cmd)
        if rest < len(text) and text[rest].isalpha():
            continue  # a longer command such as \boxedfoo
        j = rest
        while j < len(text) and text[j] in " \t":
            j += 1
        if j < len(text) and text[j] == "{":
            group = _braced_group(text, j)
            if group is not None:
                return group.strip()
        elif j > rest and j < len(text):  # "\boxed 5": up to whitespace or `$`
            m = re.match(r"[^\s$]+", text[j:])
            if m:
                return m.group(0)
    return None


def _strip_math_delimiters(answer: str) -> str:
    answer = answer.strip()
    changed = True
    while changed and answer:
        changed = False
        for left, right in (("$$", "$$"), ("$", "$"), ("\\(", "\\)"), ("\\[", "\\]")):
            if (
                len(answer) >= len(left) + len(right)
                and answer.startswith(left)
                and answer.endswith(right)
            ):
                answer = answer[len(left) : len(answer) - len(right)].strip()
                changed = True
        if answer.endswith((".", "。")) and not answer.endswith(".."):
            answer = answer[:-1].rstrip()
            changed = True
    return answer


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
