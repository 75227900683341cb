"""Every parser applied to model output runs in time linear in the output's length.

Each adversarial input is built at n = 4,000 and n = 40,000 characters; the time of the
larger must stay within 20x the smaller (linear: ~10x; the quadratic scans this replaced
took 75x to 190x). Times are thread CPU time, best of several repeats, each repeat
calling the parser enough times to take a measurable ~5 ms on the small input. The
large input first runs once in a child process with a deadline, so a quadratic parser
fails in seconds instead of hanging the suite.
"""

from __future__ import annotations

import os
import random
import re
import signal
import time
from collections.abc import Callable

import pytest

from archer_mcore.rewards.code_reward import extract_program, fenced_blocks
from archer_mcore.rewards.code_tests import call_result_matches, stdout_matches
from archer_mcore.rewards.math_extract import (
    _answer_is_matches,
    answer_is_phrase,
    extract_final_answer,
    last_boxed,
    split_equation,
)
from archer_mcore.rewards.math_reward import (
    _as_number,
    _normalize,
    _strip_unit_suffix,
    false_equation,
    is_simplified_number,
)

SMALL, BIG = 4_000, 40_000
MAX_RATIO = 20.0
BIG_DEADLINE_S = 2.0


def _time(fn: Callable[[str], object], text: str, reps: int, repeats: int = 5) -> float:
    best = float("inf")
    for _ in range(repeats):
        start = time.thread_time()
        for _ in range(reps):
            fn(text)
        best = min(best, time.thread_time() - start)
    return best


def _reps_for(fn: Callable[[str], object], text: str, target_s: float = 0.005) -> int:
    start = time.thread_time()
    fn(text)
    once = max(time.thread_time() - start, 1e-6)
    return max(1, min(10_000, int(target_s / once) + 1))


def _finishes_within(fn: Callable[[str], object], text: str, seconds: float) -> bool:
    """Run fn(text) in a forked child; False if it is still running after `seconds`.

    A child process, not a thread: `re` holds the GIL for a whole match, so a thread
    stuck in a quadratic regex cannot be timed out from this process."""
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        try:
            fn(text)
        finally:
            os._exit(0)
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if os.waitpid(pid, os.WNOHANG)[0]:
            return True
        time.sleep(0.01)
    os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)
    return False


def time_ratio(fn: Callable[[str], object], make: Callable[[int], str]) -> float:
    """Time of fn(make(BIG)) over time of fn(make(SMALL)) (same number of calls).

    The big input first runs once in a child with a deadline of 3 * MAX_RATIO times
    the small input's time (at least BIG_DEADLINE_S): a quadratic parser fails fast."""
    small, big = make(SMALL), make(BIG)
    reps = _reps_for(fn, small)
    t_small = _time(fn, small, reps)
    deadline = max(BIG_DEADLINE_S, 3 * MAX_RATIO * t_small / reps)
    if not _finishes_within(fn, big, deadline):
        return float("inf")
    return _time(fn, big, reps) / t_small


def _stdout_vs(text: str) -> bool:
    """Compare with a copy whose last character differs: every token is compared."""
    return stdout_matches(text, text[:-1] + ("2" if text[-1] != "2" else "3"))


ADVERSARIAL: dict[str, tuple[Callable[[str], object], Callable[[int], str]]] = {
    # code fences (extract_program runs in the trainer process)
    "fence_unterminated_header": (extract_program, lambda n: "```" + "a" * n),
    "fence_blank_header": (extract_program, lambda n: "```" + " " * n),
    "fence_backticks_only": (extract_program, lambda n: "`" * n),
    "fence_many_openers": (extract_program, lambda n: "```a" * (n // 4)),
    "fence_unterminated_body": (extract_program, lambda n: "```python\n" + "x\n" * (n // 2)),
    "fence_many_bodies": (extract_program, lambda n: "```\nx\n" * (n // 6) + "```python\n"),
    # \boxed and "answer is" extraction
    "boxed_unclosed": (extract_final_answer, lambda n: "\\boxed{" * (n // 7)),
    "boxed_bare_spaces": (last_boxed, lambda n: "\\boxed" + " " * n),
    "answer_is_newlines": (extract_final_answer, lambda n: "answer is" + "\n" * n),
    "answer_colon_spaces": (answer_is_phrase, lambda n: "answer:" + " \n" * (n // 2)),
    "final_spaces": (answer_is_phrase, lambda n: "final" + " " * n + "x"),
    "answer_many": (answer_is_phrase, lambda n: "answer is " * (n // 10)),
    "answer_dollars": (answer_is_phrase, lambda n: "answer is " + "$" * n),
    # answer form and number parsing (math worker)
    "units_percent": (is_simplified_number, lambda n: "%" * n + "x"),
    "units_text": (is_simplified_number, lambda n: "\\text{a}" * (n // 8) + "x"),
    "units_circ": (is_simplified_number, lambda n: "^\\circ" * (n // 6) + "x"),
    "digits_then_junk": (_as_number, lambda n: "1" * n + "x"),
    "thousands_then_junk": (is_simplified_number, lambda n: "1" + ",111" * (n // 4) + "x"),
    "normalize_spaces": (_normalize, lambda n: " \t" * (n // 2)),
    # boxed equations (item: a false equation is not scored by its right-hand side)
    "equation_many_equals": (split_equation, lambda n: "=" * n),
    "equation_nested_braces": (split_equation, lambda n: "{" * (n // 2) + "=" * (n // 2)),
    "equation_same_sides": (false_equation, lambda n: "=".join(["1"] * (n // 2))),
    "equation_distinct_sides": (false_equation, lambda n: "=".join(map(str, range(n // 5)))),
    # program output comparison
    "stdout_long_number": (_stdout_vs, lambda n: "1" * n),
    "stdout_many_tokens": (_stdout_vs, lambda n: "1.5 " * (n // 4) + "1"),
    "call_result_long_number": (lambda s: call_result_matches(s, 1.5), lambda n: "1" * n),
}


@pytest.mark.parametrize("name", sorted(ADVERSARIAL))
def test_parser_time_is_linear_in_the_output_length(name: str) -> None:
    fn, make = ADVERSARIAL[name]
    ratio = time_ratio(fn, make)
    assert ratio <= MAX_RATIO, f"{name}: 10x longer input took {ratio:.1f}x the time"


# The linear scanners find what the regexes they replaced found (on inputs small enough
# for the regexes): random strings over the pieces each one cares about.
OLD_FENCE = re.compile(r"```[ \t]*([A-Za-z0-9_+-]*)[^\n]*\n(.*?)```", re.DOTALL)
OLD_ANSWER_IS = re.compile(
    r"(?:final\s+answer|answer)\s*(?:is|:|=)\s*:?\s*(?P<ans>[^\n]+)", re.IGNORECASE
)
OLD_UNIT_SUFFIX = re.compile(r"(?:\\(?:text|mbox|mathrm)\{[A-Za-z.]*\}|\^\{?\\circ\}?|\\?%)+$")


def _random_texts(pieces: list[str], count: int = 3000, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return ["".join(rng.choices(pieces, k=rng.randint(0, 12))) for _ in range(count)]


def test_fenced_blocks_are_what_the_old_regex_found() -> None:
    pieces = ["```", "`", "python", "py ", "C++", "\n", " ", "\t", "x = 1", "``"]
    for text in _random_texts(pieces):
        expected = [(lang.lower(), body) for lang, body in OLD_FENCE.findall(text)]
        assert fenced_blocks(text) == expected, repr(text)


def test_answer_is_matches_are_what_the_old_regex_found() -> None:
    pieces = ["answer", "Final ", "final", " is", " IS", ":", "=", " ", "\n", "5", "x", "\t"]
    for text in _random_texts(pieces):
        # where only blanks followed a phrase, the old regex backtracked to a blank or a
        # lone ":" as the answer; the scanner finds no answer there
        old = [m.group("ans") for m in OLD_ANSWER_IS.finditer(text)]
        new = _answer_is_matches(text)
        assert _meaningful(old) == _meaningful(new), repr(text)
        if old == new:
            assert answer_is_phrase(text) == _old_answer_is_phrase(old), repr(text)


def _meaningful(answers: list[str]) -> list[str]:
    return [a for a in answers if a.strip() not in ("", ":")]


def _old_answer_is_phrase(matches: list[str]) -> str | None:
    from archer_mcore.rewards.math_extract import _answer_span, _strip_math_delimiters

    for ans in reversed(matches):
        candidate = _strip_math_delimiters(_answer_span(ans))
        inner = last_boxed(candidate)
        if inner is not None:
            return inner
        if candidate:
            return candidate
    return None


def test_unit_suffix_is_what_the_old_regex_removed() -> None:
    pieces = ["5", "%", "\\%", "\\", "^\\circ", "^{\\circ}", "{", "}", "\\text{cm}",
              "\\mbox{m.}", "\\mathrm{kg}", "\\text{1}", "x", "^"]  # fmt: skip
    for text in _random_texts(pieces):
        assert _strip_unit_suffix(text) == OLD_UNIT_SUFFIX.sub("", text), repr(text)
