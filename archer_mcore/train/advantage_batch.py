"""From scored rollout groups to the tensors of one training batch.

The batch is the Megatron policy's `PolicyBatch` (B = groups x n rows; input_ids [B, T]
prompt + response + padding; response-aligned [B, L] masks and log-probs), plus the
rollout engine's own log-probs [B, L] for the mismatch metrics.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

from archer_mcore.actor.policy_batch import PolicyBatch
from archer_mcore.algo.advantages import grpo_advantages, overlong_penalty
from archer_mcore.rollout.types import Sample


@dataclass
class ScoredGroup:
    """One prompt's n samples with their verdicts.

    correct: [n] 0/1 accuracy (1.0 correct).
    scores: [n] graded scores in [0, 1] when the group's reward kind is graded
        (`RewardResult.score`; a reward fault scores 0.0), else None (pass/fail).
    """

    samples: list[Sample]
    correct: list[float]
    data_source: str = ""
    scores: list[float] | None = field(default=None, kw_only=True)

    @property
    def reward_signal(self) -> list[float]:
        """[n] what the reward is made of: the graded scores, else the correctness
        (the group filter keeps groups where it varies)."""
        return self.scores if self.scores is not None else self.correct


@dataclass(frozen=True, kw_only=True)
class AdvantageSettings:
    """How rewards and advantages are made from scored groups (`build_batch`).

    reward_correct / reward_incorrect: the reward of a correct / incorrect response;
        a graded score s in [0, 1] maps linearly between them (`shaped_rewards`).
    norm_adv_by_std: GRPO's division by the group's reward std (False: Dr. GRPO).
    overlong: (max_length, cache_length) in tokens for DAPO's overlong shaping; None: off.
    """

    reward_correct: float
    reward_incorrect: float
    norm_adv_by_std: bool
    overlong: tuple[int, int] | None


@dataclass
class TrainBatch:
    policy: PolicyBatch
    rollout_logp: Tensor  # [B, L] float32, the engine's log-probs of the response tokens
    rewards: Tensor  # [G, n] shaped rewards

    @property
    def num_response_tokens(self) -> int:
        return int(self.policy.response_mask.sum())


def shaped_rewards(groups: Sequence[ScoredGroup], settings: AdvantageSettings) -> Tensor:
    """[G, n] float32 rewards, plus DAPO's overlong penalty of the response length when
    `settings.overlong` = (max_length, cache_length).

    Pass/fail groups: reward_correct / reward_incorrect by correctness. Graded groups
    (`scores` set): reward_incorrect + s * (reward_correct - reward_incorrect) for the
    score s in [0, 1], computed in float64 and rounded once to float32 (s = 1 gives
    reward_correct, s = 0 reward_incorrect)."""
    correct = torch.tensor([g.correct for g in groups], dtype=torch.float32)
    rewards = torch.where(correct > 0, settings.reward_correct, settings.reward_incorrect).float()
    low, high = settings.reward_incorrect, settings.reward_correct
    for i, g in enumerate(groups):
        if g.scores is not None:
            s = torch.tensor(g.scores, dtype=torch.float64)
            rewards[i] = (low + s * (high - low)).float()
    if settings.overlong is not None:
        lengths = torch.tensor([[len(s.token_ids) for s in g.samples] for g in groups])
        rewards = rewards + overlong_penalty(lengths, *settings.overlong)
    return rewards


def graded_metrics(groups: Sequence[ScoredGroup]) -> dict[str, float]:
    """reward/graded_fraction (share of the responses whose kind is graded) and the
    graded scores' reward/score_mean and reward/score_std (population std, over the
    graded responses); {} when no response is graded, so a pass/fail run logs none."""
    n = sum(len(g.correct) for g in groups)
    scores = [x for g in groups if g.scores is not None for x in g.scores]
    if not scores:
        return {}
    t = torch.tensor(scores, dtype=torch.float64)
    return {
        "reward/graded_fraction": len(scores) / max(1, n),
        "reward/score_mean": float(t.mean()),
        "reward/score_std": float(t.std(unbiased=False)),
    }


def build_batch(
    groups: Sequence[ScoredGroup], *, settings: AdvantageSettings, pad_id: int = 0
) -> TrainBatch:
    """The training batch of `groups` (advantages: GRPO over each group's rewards,
    `shaped_rewards`)."""
    if not groups:
        raise ValueError("build_batch needs at least one group")
    n = len(groups[0].samples)
    if any(len(g.samples) != n for g in groups):
        raise ValueError("every group must have the same number of samples")
    rewards = shaped_rewards(groups, settings)
    adv = grpo_advantages(rewards, norm_by_std=settings.norm_adv_by_std).reshape(-1)

    samples = [s for g in groups for s in g.samples]
    width = max(len(s.prompt_ids) + len(s.token_ids) for s in samples)
    resp_width = max(1, max(len(s.token_ids) for s in samples))
    ids = torch.full((len(samples), width), pad_id, dtype=torch.long)
    prompt_lengths = torch.zeros(len(samples), dtype=torch.long)
    mask = torch.zeros(len(samples), resp_width, dtype=torch.bool)
    rollout_logp = torch.zeros(len(samples), resp_width, dtype=torch.float32)
    for b, s in enumerate(samples):
        p, r = len(s.prompt_ids), len(s.token_ids)
        ids[b, : p + r] = torch.tensor(list(s.prompt_ids) + list(s.token_ids), dtype=torch.long)
        prompt_lengths[b] = p
        mask[b, :r] = True
        rollout_logp[b, :r] = torch.tensor(s.logprobs, dtype=torch.float32)
    policy = PolicyBatch(ids, prompt_lengths, mask, advantages=adv.float())
    return TrainBatch(policy, rollout_logp, rewards)


def group_rows(group_index: Tensor, group_size: int) -> Tensor:
    """Row indices [len(group_index) * n] of whole groups, groups in the given order."""
    return (group_index.unsqueeze(1) * group_size + torch.arange(group_size)).reshape(-1)
