"""Reward scoring of a rollout batch: decode each response and score the whole batch
in one call to the reward scorer."""

from __future__ import annotations

from collections.abc import Sequence

from archer_mcore.data.prompt_dataset import PromptExample
from archer_mcore.rewards.types import RewardRequest
from archer_mcore.rollout.types import RolloutBatch
from archer_mcore.train.advantage_batch import ScoredGroup
from archer_mcore.train.protocols import RewardScorer, Tokenizer


def score_groups(
    scorer: RewardScorer,
    tokenizer: Tokenizer,
    prompts: Sequence[PromptExample],
    batch: RolloutBatch,
) -> list[ScoredGroup]:
    """Decode every response (without its eos) and score the whole batch in one call;
    group i answers prompts[i] and holds its n verdicts (1.0 correct, 0.0 not), and
    when its reward kind is graded the n scores in [0, 1] (a fault's: 0.0)."""
    eos = tokenizer.eos_token_id
    requests = [
        RewardRequest(
            response=tokenizer.decode(
                s.token_ids[:-1] if s.token_ids and s.token_ids[-1] == eos else s.token_ids,
                skip_special_tokens=True,
            ),
            ground_truth=prompt.ground_truth,
            data_source=prompt.data_source,
            kind=prompt.reward_kind,
            extra=dict(prompt.extra_info),
        )
        for prompt, group in zip(prompts, batch.groups)
        for s in group
    ]
    results = iter(scorer.score_batch(requests))
    groups = []
    for prompt, group in zip(prompts, batch.groups):
        verdicts = [next(results) for _ in group]
        graded = any(r.graded for r in verdicts)
        groups.append(
            ScoredGroup(
                samples=list(group),
                correct=[float(r.correct) for r in verdicts],
                data_source=prompt.data_source,
                scores=[r.score if r.graded else 0.0 for r in verdicts] if graded else None,
            )
        )
    return groups
