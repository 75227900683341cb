"""What the trainer sends to the reward workers and what it gets back.

A `RewardRequest` is one response to score; a `RewardResult` is its verdict. Scores
are pass/fail: `score` is 1.0 when `correct`, else 0.0 (the trainer maps correctness
to its own reward values, e.g. DAPO's +1 / -1). `fraction_passed` is a metric: the
share of test cases a program passed (1.0 / 0.0 for math).
"""

from __future__ import annotations

from dataclasses import dataclass, field
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
    """

    response: str
    ground_truth: Any
    data_source: str = ""
    kind: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class RewardResult:
    """The verdict on one response.

    score: 1.0 if correct else 0.0.
    fraction_passed: share of test cases passed, in [0, 1] (math: 1.0 or 0.0).
    failure: None when correct, else one of the reason constants in this module.
    detail: a short human-readable explanation (an error message, the extracted answer).
    elapsed_s: wall-clock seconds spent scoring.
    """

    score: float
    correct: bool
    fraction_passed: float
    failure: str | None = None
    detail: str = ""
    elapsed_s: float = 0.0

    @staticmethod
    def passed(detail: str = "", fraction_passed: float = 1.0) -> RewardResult:
        return RewardResult(1.0, True, fraction_passed, None, detail)

    @staticmethod
    def failed(reason: str, detail: str = "", fraction_passed: float = 0.0) -> RewardResult:
        return RewardResult(0.0, False, fraction_passed, reason, detail)

    @property
    def is_fault(self) -> bool:
        """True when the reward machinery failed (timeout, crash, OOM, error...)."""
        return self.failure in REWARD_FAULTS
