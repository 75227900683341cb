"""From scored rollout groups to the tensors of one training batch.

The batch is the Megatron policy's `PolicyBatch` (B = groups x n rows; input_ids [B, T]
prompt + response + padding; response-aligned [B, L] masks and log-probs), plus the
rollout engine's own log-probs [B, L] for the mismatch metrics.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from archer_mcore.actor.policy_batch import PolicyBatch
from archer_mcore.algo.advantages import grpo_advantages, overlong_penalty
from archer_mcore.rollout.types import Sample


@dataclass
class ScoredGroup:
    """One prompt's n samples with their verdicts: correct [n] (0/1 accuracy)."""

    samples: list[Sample]
    correct: list[float]
    data_source: str = ""


@dataclass
class TrainBatch:
    policy: PolicyBatch
    rollout_logp: Tensor  # [B, L] float32, the engine's log-probs of the response tokens
    rewards: Tensor  # [G, n] shaped rewards

    @property
    def num_response_tokens(self) -> int:
        return int(self.policy.response_mask.sum())


def shaped_rewards(
    groups: Sequence[ScoredGroup],
    reward_correct: float,
    reward_incorrect: float,
    overlong: tuple[int, int] | None,
) -> Tensor:
    """[G, n]: reward_correct / reward_incorrect by correctness, plus DAPO's overlong
    penalty of the response length when `overlong` = (max_length, cache_length)."""
    correct = torch.tensor([g.correct for g in groups], dtype=torch.float32)
    rewards = torch.where(correct > 0, reward_correct, reward_incorrect).float()
    if overlong is not None:
        lengths = torch.tensor([[len(s.token_ids) for s in g.samples] for g in groups])
        rewards = rewards + overlong_penalty(lengths, *overlong)
    return rewards


def build_batch(
    groups: Sequence[ScoredGroup],
    reward_correct: float,
    reward_incorrect: float,
    norm_adv_by_std: bool,
    overlong: tuple[int, int] | None,
    pad_id: int = 0,
) -> TrainBatch:
    """The training batch of `groups` (advantages: GRPO over each group's rewards)."""
    if not groups:
        raise ValueError("build_batch needs at least one group")
    n = len(groups[0].samples)
    if any(len(g.samples) != n for g in groups):
        raise ValueError("every group must have the same number of samples")
    rewards = shaped_rewards(groups, reward_correct, reward_incorrect, overlong)
    adv = grpo_advantages(rewards, norm_by_std=norm_adv_by_std).reshape(-1)

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
