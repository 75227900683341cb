"""Graded rewards reach the advantages (issue 25 item 3): a graded group's scores s in
[0, 1] become rewards reward_incorrect + s * (reward_correct - reward_incorrect), DAPO's
overlong penalty still applies, and GRPO normalises them; checked against a float64
reimplementation written here from the formulas. Pass/fail groups are unchanged, the
group filter reads the graded scores, the scores survive the scorer -> groups step and
the async checkpoint state, and their metrics are logged only when some are graded."""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch

from archer_mcore.rewards.types import RewardResult
from archer_mcore.rollout.types import RolloutBatch, Sample
from archer_mcore.train.advantage_batch import (
    AdvantageSettings,
    ScoredGroup,
    build_batch,
    graded_metrics,
    shaped_rewards,
)


def _sample(g: int, j: int, length: int) -> Sample:
    return Sample(
        prompt_index=g,
        sample_index=j,
        prompt_ids=[1, 2, 3],
        token_ids=[5 + (t % 7) for t in range(length)],
        logprobs=[-0.5] * length,
        finish_reason="stop",
    )


def _group(
    g: int, lengths: list[int], correct: list[float], scores: list[float] | None
) -> ScoredGroup:
    return ScoredGroup(
        samples=[_sample(g, j, n) for j, n in enumerate(lengths)],
        correct=correct,
        data_source="src",
        scores=scores,
    )


def _reference(
    groups: list[ScoredGroup], rc: float, ri: float, overlong: tuple[int, int] | None, by_std: bool
) -> tuple[list[list[float]], list[list[float]]]:
    """(rewards, advantages) in float64 Python arithmetic, from the documented formulas."""
    rewards, advantages = [], []
    for g in groups:
        row = []
        for j, s in enumerate(g.samples):
            if g.scores is not None:
                r = ri + g.scores[j] * (rc - ri)
            else:
                r = rc if g.correct[j] > 0 else ri
            if overlong is not None:
                lmax, cache = overlong
                over = max(0.0, len(s.token_ids) - (lmax - cache))
                r += -min(over / cache, 1.0)
            row.append(r)
        mean = sum(row) / len(row)
        std = math.sqrt(sum((x - mean) ** 2 for x in row) / (len(row) - 1))
        advantages.append([(x - mean) / (std + 1e-6) if by_std else x - mean for x in row])
        rewards.append(row)
    return rewards, advantages


GROUPS = [
    # graded: scores in [0, 1], one long response inside the overlong ramp
    ([10, 30, 44, 12], [0.0, 1.0, 0.0, 0.0], [0.25, 1.0, 0.6, 0.0]),
    # pass/fail
    ([8, 9, 50, 11], [1.0, 0.0, 1.0, 0.0], None),
    # graded with equal scores: no signal, advantage 0 (without overlong)
    ([7, 7, 7, 7], [0.0, 0.0, 0.0, 0.0], [0.3, 0.3, 0.3, 0.3]),
]


@pytest.mark.parametrize("overlong", [None, (48, 16)])
@pytest.mark.parametrize("by_std", [True, False])
@pytest.mark.parametrize(("rc", "ri"), [(1.0, 0.0), (1.0, -1.0), (0.7, -0.3)])
def test_graded_scores_reach_the_advantages(
    rc: float, ri: float, by_std: bool, overlong: tuple[int, int] | None
) -> None:
    groups = [_group(i, *spec) for i, spec in enumerate(GROUPS)]
    settings = AdvantageSettings(
        reward_correct=rc, reward_incorrect=ri, norm_adv_by_std=by_std, overlong=overlong
    )
    batch = build_batch(groups, settings=settings, pad_id=0)
    ref_rewards, ref_adv = _reference(groups, rc, ri, overlong, by_std)
    assert batch.rewards.dtype == torch.float32
    assert torch.allclose(
        batch.rewards.double(), torch.tensor(ref_rewards, dtype=torch.float64), atol=1e-6
    )
    assert torch.allclose(
        batch.policy.advantages.double(),
        torch.tensor(ref_adv, dtype=torch.float64).reshape(-1),
        atol=2e-5,
    )
    # the graded endpoints are exactly the pass/fail rewards
    assert batch.rewards[0, 1].item() == pytest.approx(rc, abs=1e-7)
    # a graded group of equal scores carries no signal
    if overlong is None:
        assert torch.all(batch.policy.advantages[8:] == 0)


def test_pass_fail_rewards_are_exactly_the_configured_values() -> None:
    """Ungraded groups take the reward_correct / reward_incorrect values themselves (no
    arithmetic that could round them): the pass/fail path is what it was."""
    group = _group(0, [4, 4, 4], [1.0, 0.0, 1.0], None)
    settings = AdvantageSettings(
        reward_correct=0.3, reward_incorrect=0.1, norm_adv_by_std=True, overlong=None
    )
    rewards = shaped_rewards([group], settings)
    expected = torch.tensor([[0.3, 0.1, 0.3]], dtype=torch.float32)
    assert torch.equal(rewards, expected)


def test_graded_metrics() -> None:
    groups = [_group(i, *spec) for i, spec in enumerate(GROUPS)]
    scores = [0.25, 1.0, 0.6, 0.0, 0.3, 0.3, 0.3, 0.3]
    mean = sum(scores) / len(scores)
    std = math.sqrt(sum((x - mean) ** 2 for x in scores) / len(scores))
    metrics = graded_metrics(groups)
    assert metrics == {
        "reward/graded_fraction": pytest.approx(8 / 12),
        "reward/score_mean": pytest.approx(mean),
        "reward/score_std": pytest.approx(std),
    }
    assert graded_metrics([groups[1]]) == {}  # pass/fail only: no keys at all


class _Scorer:
    """Returns the given results in order (the RewardScorer protocol)."""

    def __init__(self, results: list[RewardResult]) -> None:
        self.results = results

    def score_batch(self, requests: list[Any]) -> list[RewardResult]:
        assert len(requests) == len(self.results)
        return self.results


class _Tokenizer:
    eos_token_id = 0

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return " ".join(map(str, ids))


def test_score_groups_carries_graded_scores() -> None:
    from archer_mcore.data.prompt_dataset import PromptExample
    from archer_mcore.train.scoring import score_groups

    prompts = [
        PromptExample(
            prompt_ids=[1],
            prompt_text="p",
            messages=[],
            ground_truth="1",
            data_source=f"s{i}",
            reward_style="",
            extra_info={},
            source="mem",
        )
        for i in range(2)
    ]
    batch = RolloutBatch(
        groups=[[_sample(0, 0, 2), _sample(0, 1, 2)], [_sample(1, 0, 2), _sample(1, 1, 2)]]
    )
    graded = [
        RewardResult(score=0.4, correct=False, fraction_passed=0.0, graded=True),
        RewardResult(score=1.0, correct=True, fraction_passed=1.0, graded=True),
    ]
    plain = [RewardResult.passed(), RewardResult.failed("wrong_answer")]
    groups = score_groups(_Scorer(graded + plain), _Tokenizer(), prompts, batch)
    assert groups[0].scores == [0.4, 1.0] and groups[0].correct == [0.0, 1.0]
    assert groups[1].scores is None and groups[1].correct == [1.0, 0.0]
    assert groups[0].reward_signal == [0.4, 1.0] and groups[1].reward_signal == [1.0, 0.0]


def test_group_filter_reads_graded_scores() -> None:
    """All-wrong but differently graded responses carry a GRPO signal: kept; equal
    scores are dropped like an all-wrong pass/fail group."""
    from archer_mcore.config import Config
    from archer_mcore.train.collect import collect_with

    cfg = Config()
    cfg.train.prompts_per_step = 3
    cfg.algorithm.group_filter = "drop"
    varied = _group(0, [3, 3], [0.0, 0.0], [0.2, 0.7])
    flat = _group(1, [3, 3], [0.0, 0.0], [0.5, 0.5])
    mixed = _group(2, [3, 3], [1.0, 0.0], None)
    outcome = collect_with(cfg, lambda k: [varied, flat, mixed])
    assert outcome.groups == [varied, mixed]
    assert outcome.dropped_groups == 1


def test_async_state_keeps_the_scores() -> None:
    from archer_mcore.train.rollout_scheduler import groups_from_state, groups_to_state

    groups = [_group(0, [2, 3], [0.0, 1.0], [0.5, 1.0]), _group(1, [2, 2], [1.0, 0.0], None)]
    state = groups_to_state(groups)
    back = groups_from_state(state)
    assert [g.scores for g in back] == [[0.5, 1.0], None]
    # a state written before graded rewards (no "scores" key) loads as pass/fail
    old = [{k: v for k, v in g.items() if k != "scores"} for g in state]
    assert [g.scores for g in groups_from_state(old)] == [None, None]
