"""What the trainer sends to the reward workers and what it gets back.

A `RewardRequest` is one response to score; a `RewardResult` is its verdict. For a
pass/fail kind (math, code) `score` is 1.0 when `correct`, else 0.0, and the trainer
maps correctness to its own reward values (e.g. DAPO's +1 / -1). For a graded kind
(`rewards.kinds[i].graded`) `score` is a grade in [0, 1] that the trainer maps
linearly onto the same scale (train/advantage_batch.shaped_rewards). Every result's
`score` and `fraction_passed` must be finite and within [0, 1] and `correct` a bool;
the scorer turns a result that is not into a BAD_RESULT fault (`check_result`).
`fraction_passed` is a metric: the share of test cases a program passed (1.0 / 0.0
for math).
"""

from __future__ import annotations

import math
import numbers
from dataclasses import KW_ONLY, dataclass, field
from typing import Any

# Failure reasons. Answer-level ones say the response was judged and is wrong; the
# infrastructure ones (REWARD_FAULTS) say the reward itself could not finish.
WRONG_ANSWER = "wrong_answer"
NO_ANSWER = "no_answer"  # no \boxed{} / "answer is" in a math response
ANSWER_FORM = "answer_form"  # a plain-number reference, the answer not a simplified number
NO_CODE = "no_code"  # no program found in a code response
TESTS_FAILED = "tests_failed"  # the program ran and failed at least one test case
BAD_GROUND_TRUTH = "bad_ground_truth"  # the dataset's ground truth cannot be used
UNKNOWN_SOURCE = "unknown_source"  # no reward function registered for the request
TIMEOUT = "timeout"  # the reward function exceeded its time limit and was killed
OUT_OF_MEMORY = "out_of_memory"
CRASHED = "crashed"  # the reward worker process died
REWARD_ERROR = "reward_error"  # the reward function raised
SANDBOX_UNAVAILABLE = "sandbox_unavailable"  # code execution refused: no isolation
SANDBOX_SETUP_FAILED = "sandbox_setup_failed"  # the sandbox could not be set up for a run
BAD_RESULT = "bad_result"  # the reward returned a score outside [0, 1], NaN, a non-bool...

#: Failures of the reward machinery rather than of the response; the scorer counts them.
REWARD_FAULTS: frozenset[str] = frozenset(
    {
        TIMEOUT,
        OUT_OF_MEMORY,
        CRASHED,
        REWARD_ERROR,
        SANDBOX_UNAVAILABLE,
        SANDBOX_SETUP_FAILED,
        UNKNOWN_SOURCE,
        BAD_RESULT,
    }
)


@dataclass(frozen=True)
class RewardRequest:
    """One response to score.

    response: the decoded response text (the model's output, without the prompt).
    ground_truth: math: the reference answer (a string such as "6" or "\\frac{1}{2}");
        code: the test cases (see `archer_mcore.rewards.code_tests.parse_test_cases`).
    data_source: the dataset row's `data_source`; the registry maps it to a reward kind.
    kind: optional explicit reward kind ("math", "code", ...) overriding the data source.
    extra: free-form per-row information passed through to the reward function.
    kind and extra are passed by name.
    """

    response: str
    ground_truth: Any
    data_source: str = ""
    _: KW_ONLY
    kind: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, kw_only=True)
class RewardResult:
    """The verdict on one response.

    score: pass/fail kinds: 1.0 if correct else 0.0; graded kinds: the grade, a finite
        float in [0, 1] (1.0 = full marks).
    correct: whether the response is right (accuracy and pass@k count it; for a graded
        kind the function decides, a bare number returned counts as correct at 1.0).
    fraction_passed: share of test cases passed, in [0, 1] (math: 1.0 or 0.0).
    failure: None when correct, else one of the reason constants in this module.
    detail: a short human-readable explanation (an error message, the extracted answer).
    elapsed_s: wall-clock seconds spent scoring.
    graded: set by the scorer from the reward kind: True when `score` is the reward
        signal (a graded kind), False when `correct` is (pass/fail).
    """

    score: float
    correct: bool
    fraction_passed: float
    failure: str | None = None
    detail: str = ""
    elapsed_s: float = 0.0
    graded: bool = False

    @staticmethod
    def passed(detail: str = "", fraction_passed: float = 1.0) -> RewardResult:
        return RewardResult(score=1.0, correct=True, fraction_passed=fraction_passed, detail=detail)

    @staticmethod
    def failed(reason: str, detail: str = "", fraction_passed: float = 0.0) -> RewardResult:
        return RewardResult(
            score=0.0, correct=False, fraction_passed=fraction_passed, failure=reason, detail=detail
        )

    @staticmethod
    def graded_score(score: float, detail: str = "") -> RewardResult:
        """A graded verdict: `score` in [0, 1], correct at full marks (score == 1.0)."""
        full = score == 1.0
        return RewardResult(
            score=float(score),
            correct=full,
            fraction_passed=1.0 if full else 0.0,
            failure=None if full else WRONG_ANSWER,
            detail=detail,
        )

    @property
    def is_fault(self) -> bool:
        """True when the reward machinery failed (timeout, crash, OOM, error...)."""
        return self.failure in REWARD_FAULTS


def check_result(result: RewardResult) -> str | None:
    """Why `result` breaks the reward contract (module docstring), or None when it
    keeps it: `score` and `fraction_passed` finite numbers in [0, 1], `correct` a bool,
    `failure` None or a string."""
    if not isinstance(result.correct, bool):
        return f"correct must be a bool, got {type(result.correct).__name__}"
    for name in ("score", "fraction_passed"):
        value = getattr(result, name)
        if isinstance(value, bool) or not isinstance(value, numbers.Real):
            return f"{name} must be a number, got {type(value).__name__}"
        if not math.isfinite(value) or not 0.0 <= value <= 1.0:
            return f"{name} = {value!r} is not a finite number in [0, 1]"
    if result.failure is not None and not isinstance(result.failure, str):
        return f"failure must be None or a string, got {type(result.failure).__name__}"
    if not isinstance(result.detail, str):
        return f"detail must be a string, got {type(result.detail).__name__}"
    return None
