"""Reward kinds added from a config (`rewards.kinds`), outside the package.

The tests load them by import path ("custom_reward_kinds:boxed_partial_credit"), with
this directory on PYTHONPATH (the reward workers are fresh interpreters that import
them by name). Nothing in archer_mcore/ knows them.
"""

from __future__ import annotations

import re
from typing import Any

from archer_mcore.rewards.types import WRONG_ANSWER, RewardResult

#: The last \boxed{...} without nested braces (linear time: no nested quantifiers).
_BOXED = re.compile(r"\\boxed\{([^{}]{0,200})\}")


def boxed_partial_credit(response: str, ground_truth: Any, extra: dict[str, Any]) -> float:
    """A graded reward: 1.0 for a final \\boxed{} answer equal to the reference, 0.25
    for a boxed answer that is wrong, else 0.0. Pure, linear in the response length."""
    if not isinstance(response, str) or not isinstance(ground_truth, (str, int, float)):
        return 0.0
    answers = _BOXED.findall(response)
    if not answers:
        return 0.0
    return 1.0 if answers[-1].strip() == str(ground_truth).strip() else 0.25


def digit_overlap(response: str, ground_truth: Any, extra: dict[str, Any]) -> RewardResult:
    """A graded reward returning a RewardResult: the share of the reference's distinct
    digits that appear in the response; correct when all do."""
    reference = {c for c in str(ground_truth) if c.isdigit()} if ground_truth is not None else set()
    if not reference or not isinstance(response, str):
        return RewardResult.failed(WRONG_ANSWER, "no digits to compare")
    share = len(reference & set(response)) / len(reference)
    return RewardResult.graded_score(share, detail=f"{share:.2f} of the digits")


def out_of_range(response: str, ground_truth: Any, extra: dict[str, Any]) -> float:
    """Breaks the contract: a graded score of 1.5 (the scorer makes it a fault)."""
    return 1.5


def not_a_number(response: str, ground_truth: Any, extra: dict[str, Any]) -> float:
    """Breaks the contract: a NaN score."""
    return float("nan")


def two_arguments(response: str, ground_truth: Any) -> bool:
    """The wrong signature for any execution (no `extra`)."""
    return True


NOT_CALLABLE = 42

#: A lambda: fine inline, refused for execution: process (it cannot be pickled by name).
as_lambda = lambda response, ground_truth, extra: 1.0  # noqa: E731
