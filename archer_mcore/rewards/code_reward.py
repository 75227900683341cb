"""Code reward: run the response's program against the test cases in the sandbox.

Pass/fail: correct iff every case passes; `fraction_passed` is the metric. Stdin/stdout
cases run one sandboxed process each; function-call cases run together in one process
under `call_harness.py` (per-case alarm). Expected outputs and return values never
enter the sandbox: the program's stdout, or the JSON of its return values, comes out
and is compared here, in the trusted process. After a case hits the wall-time, CPU or
memory limit the remaining stdin cases are not run (they count as failed), so a
hostile program costs at most about one wall-time limit per request, plus
`max_total_s` as an overall budget.
"""

from __future__ import annotations

import re
import secrets
import time
from pathlib import Path
from typing import Any

from archer_mcore.rewards import call_harness
from archer_mcore.rewards.code_tests import (
    BadTestCases,
    CallCase,
    StdioCase,
    call_result_matches,
    parse_test_cases,
    stdout_matches,
    to_json,
)
from archer_mcore.rewards.sandbox import Sandbox, SandboxLimits, SandboxRun
from archer_mcore.rewards.types import (
    BAD_GROUND_TRUTH,
    NO_CODE,
    SANDBOX_SETUP_FAILED,
    TESTS_FAILED,
    RewardResult,
)

_HARNESS_SOURCE = Path(call_harness.__file__).read_text()
_FENCE = "```"
_FENCE_LANG = re.compile(r"[ \t]*+([A-Za-z0-9_+-]*+)")


def fenced_blocks(response: str) -> list[tuple[str, str]]:
    """(language, body) of each fenced block, in order, lower-cased language.

    A block opens with a line starting at "```" (the language is the word after it;
    the rest of that line is ignored) and ends at the next "```"; blocks do not
    overlap, and an unterminated one is not a block. This is what the regex
    "```[ \\t]*([A-Za-z0-9_+-]*)[^\\n]*\\n(.*?)```" (DOTALL) finds, scanned with
    `str.find` instead: each character is looked at a bounded number of times, so the
    time is linear in len(response) (the regex took quadratic time on an unterminated
    fence or a long fence line: 64k characters, 4.6 s, in the trainer process).
    """
    blocks: list[tuple[str, str]] = []
    pos = 0
    while (start := response.find(_FENCE, pos)) >= 0:
        newline = response.find("\n", start + len(_FENCE))
        if newline < 0:
            break  # no line break after any later fence either: no more blocks
        end = response.find(_FENCE, newline + 1)
        if end < 0:
            break  # unterminated: neither this nor a later opener can close
        lang = _FENCE_LANG.match(response, start + len(_FENCE), newline)
        blocks.append((lang.group(1).lower() if lang else "", response[newline + 1 : end]))
        pos = end + len(_FENCE)
    return blocks


def extract_program(response: str) -> str | None:
    """The last fenced code block (```python preferred over other languages); None if none."""
    blocks = fenced_blocks(response)
    if not blocks:
        return None
    python_blocks = [body for lang, body in blocks if lang in ("python", "py", "python3")]
    untagged = [body for lang, body in blocks if lang == ""]
    chosen = (python_blocks or untagged or [None])[-1]
    return chosen if chosen and chosen.strip() else None


class SandboxSetupFailed(Exception):
    """A run's sandbox could not be set up: the program never ran, nothing was judged."""


def _checked(run: SandboxRun) -> SandboxRun:
    if run.setup_failed:
        raise SandboxSetupFailed(run.describe())
    return run


def _resource_killed(run: SandboxRun) -> bool:
    return run.timed_out or run.output_overflow or (run.exit_code or 0) > 128


def _run_stdio(
    sandbox: Sandbox, program: str, cases: list[StdioCase], deadline: float
) -> tuple[int, str]:
    passed, note = 0, ""
    for k, case in enumerate(cases):
        if time.monotonic() > deadline:
            return passed, note or f"time budget exhausted after {k} cases"
        stdin = case.stdin.encode("utf-8", "surrogatepass")  # JSON may hold "\\ud800"
        run = _checked(sandbox.run_python(program, stdin=stdin))
        ok = (
            run.exit_code == 0
            and not run.output_overflow
            and stdout_matches(run.stdout.decode(errors="replace"), case.expected_stdout)
        )
        passed += ok
        if not ok and not note:
            note = f"case {k}: " + ("wrong output" if run.exit_code == 0 else run.describe())
        if _resource_killed(run):
            return passed, note  # do not spend another full limit on the next cases
    return passed, note


def _run_calls(
    sandbox: Sandbox, program: str, cases: list[CallCase], per_case_s: float
) -> tuple[int, str]:
    """Run every call in one sandboxed process; judge the returned values here.

    Only the function names and arguments enter the sandbox; the program sends each
    return value out as JSON and `call_result_matches` compares it with the expected
    value in this (trusted) process. A case reported more than once fails.
    """
    tag = secrets.token_hex(8)
    payload = [{"fn_name": c.fn_name, "args": c.args} for c in cases]
    run = _checked(
        sandbox.run(
            {"main.py": _HARNESS_SOURCE, "solution.py": program, "calls.json": to_json(payload)},
            [sandbox.python, "-I", "-B", "main.py", tag, str(per_case_s)],
            limits=sandbox.limits,
        )
    )
    reports: dict[int, list[tuple[str, str]]] = {}
    for line in run.stdout.decode(errors="replace").splitlines():
        parts = line.split(" ", 3)
        if len(parts) == 4 and parts[0] == tag and parts[1].isdigit():
            reports.setdefault(int(parts[1]), []).append((parts[2], parts[3]))
    passed, note = 0, ""
    for k, case in enumerate(cases):
        got = reports.get(k, [])
        if len(got) == 1 and got[0][0] == "ok" and call_result_matches(got[0][1], case.expected):
            passed += 1
        elif not note:
            if not got:
                why = "not run (" + run.describe() + ")"
            elif len(got) > 1:
                why = "reported more than once"
            else:
                why = "wrong" if got[0][0] == "ok" else got[0][1][:200]
            note = f"case {k}: {why}"
    return passed, note


def _is_utf8(text: str) -> bool:
    """False for text with lone surrogates, which no file or interpreter can hold."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def score_code(
    response: str,
    ground_truth: Any,
    sandbox: Sandbox,
    fn_name: str | None = None,
    max_total_s: float | None = None,
) -> RewardResult:
    """Score a code response by running its last fenced program on the test cases.

    max_total_s: overall budget for the stdin cases (default 3x the wall limit).
    A sandbox that cannot be set up is a reward fault (SANDBOX_SETUP_FAILED), never a
    wrong answer: the program was not run.
    """
    program = extract_program(response)
    if program is None:
        return RewardResult.failed(NO_CODE, "no fenced code block in the response")
    try:
        cases = parse_test_cases(ground_truth, fn_name)
    except BadTestCases as err:
        return RewardResult.failed(BAD_GROUND_TRUTH, str(err))
    if not _is_utf8(program):
        detail = f"0/{len(cases)} cases; the program is not valid UTF-8 (lone surrogates): not run"
        return RewardResult.failed(TESTS_FAILED, detail, fraction_passed=0.0)
    limits: SandboxLimits = sandbox.limits
    budget = max_total_s if max_total_s is not None else 3 * limits.wall_s
    stdio = [c for c in cases if isinstance(c, StdioCase)]
    calls = [c for c in cases if isinstance(c, CallCase)]
    passed, notes = 0, []
    try:
        if stdio:
            n, note = _run_stdio(sandbox, program, stdio, time.monotonic() + budget)
            passed += n
            notes.append(note)
        if calls:
            per_case = max(0.1, min(limits.wall_s, limits.cpu_s) / max(1, len(calls)) * 2)
            n, note = _run_calls(sandbox, program, calls, per_case)
            passed += n
            notes.append(note)
    except SandboxSetupFailed as err:
        return RewardResult.failed(SANDBOX_SETUP_FAILED, str(err)[:500])
    fraction = passed / len(cases)
    if passed == len(cases):
        return RewardResult.passed(f"{passed}/{len(cases)} cases", fraction_passed=1.0)
    detail = f"{passed}/{len(cases)} cases; " + "; ".join(n for n in notes if n)
    return RewardResult.failed(TESTS_FAILED, detail, fraction_passed=fraction)
