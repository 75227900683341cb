"""The policy side of an RL step: the old (and reference) log-probs of the rollout,
the mini-batch schedule, and the update with its non-finite guard.

Shapes: B = groups x n rows, L = the longest response; log-probs, entropies and masks
are [B, L] (response-aligned, as in `PolicyBatch`).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import Tensor

from archer_mcore.actor.policy_batch import PolicyBatch, with_fields
from archer_mcore.actor.protocol import Policy
from archer_mcore.algo.rollout_correction import truncated_is_weights
from archer_mcore.algo.token_rules import token_rule_for
from archer_mcore.config import AlgorithmConfig, TrainConfig
from archer_mcore.train.advantage_batch import TrainBatch, group_rows

log = logging.getLogger("archer.train")


class NonFiniteLossError(RuntimeError):
    """Too many consecutive updates with a non-finite loss; the last good checkpoint stays."""


@dataclass
class OldPolicyScores:
    """The scoring pass over the rollout: `batch` is the policy batch with old_logp,
    ref_logp (when the loss has a reference) and token_weights (truncated importance
    sampling, when `rollout.tis_cap` is set) filled in; logp and entropy [B, L] are the
    old policy's."""

    batch: PolicyBatch
    logp: Tensor
    entropy: Tensor


def score_old_policy(policy: Policy, batch: TrainBatch, tis_cap: float | None) -> OldPolicyScores:
    """Old and reference log-probs, forward only; with a cap, the truncated IS weights
    w = min(pi_old / pi_rollout, cap) [B, L] on the policy gradient."""
    old_logp, old_entropy = policy.compute_logprobs(batch.policy)
    ref_logp = policy.compute_ref_logprobs(batch.policy) if policy.reference is not None else None
    mask = batch.policy.response_mask
    weights = truncated_is_weights(old_logp, batch.rollout_logp, tis_cap, mask) if tis_cap else None
    full = with_fields(batch.policy, old_logp=old_logp, ref_logp=ref_logp, token_weights=weights)
    return OldPolicyScores(full, old_logp, old_entropy)


def minibatch_rows(groups: int, group_size: int, t: TrainConfig, step: int) -> Iterator[Tensor]:
    """The row indices of each mini-batch of the step, in update order.

    `train.ppo_epochs` passes; each shuffles the groups (a generator seeded by
    `train.seed`, the step and the epoch) and cuts them into the configured number of
    mini-batches per epoch, `train.prompts_per_step // train.mini_batch_prompts`,
    however many groups the filter kept (fewer groups make smaller mini-batches, not
    more of them). A mini-batch holds whole groups: group_size rows each.
    """
    n_mb = min(groups, t.prompts_per_step // t.mini_batch_prompts)
    per_mb = math.ceil(groups / n_mb)
    for epoch in range(t.ppo_epochs):
        g = torch.Generator().manual_seed(t.seed * 1_000_003 + step * 101 + epoch)
        order = torch.randperm(groups, generator=g)
        for lo in range(0, groups, per_mb):
            yield group_rows(order[lo : lo + per_mb], group_size)


def minibatch_selection(
    a: AlgorithmConfig, entropy: Tensor, mask: Tensor, rows: Tensor
) -> Tensor | None:
    """The token rule's selection [B, L] for the mini-batch `rows`, or None
    (`TokenRule.minibatch_selection`).

    Forking tokens with `algorithm.token_rule.scope` mini_batch: the top-rho tokens of
    the whole mini-batch (the rows of every data-parallel rank together), ranked by
    `entropy` [B, L], the entropies the old policy gave in the scoring pass (for the
    first mini-batch of the first epoch that is the policy being updated). micro_batch
    (and the rules without a mini-batch selection): None, and the loss selects within
    each micro-batch by the current policy's entropies.
    """
    return token_rule_for(a).minibatch_selection(entropy, mask, rows)


def update_skipped(update: dict[str, float]) -> bool:
    """Whether the policy skipped this update: a non-finite loss or gradient."""
    return bool(update.get("update_skipped")) or not math.isfinite(update.get("loss", 0.0))


@dataclass
class NonFiniteGuard:
    """`train.max_nonfinite_in_a_row` skipped updates in a row stop the run."""

    limit: int
    in_a_row: int = 0

    def record(self, update: dict[str, float], step: int, last_checkpoint: str | None) -> bool:
        """Account one update's metrics; True when it was skipped. Raises
        NonFiniteLossError at the limit (the last good checkpoint stays)."""
        if not update_skipped(update):
            self.in_a_row = 0
            return False
        self.in_a_row += 1
        log.warning(
            "step %d: non-finite loss or gradient, update skipped (%d in a row)",
            step,
            self.in_a_row,
        )
        if self.in_a_row >= self.limit:
            raise NonFiniteLossError(
                f"{self.in_a_row} non-finite updates in a row at step {step}; stopping. "
                f"Last good checkpoint: {last_checkpoint or 'none'}"
            )
        return True


def update_policy(
    policy: Policy,
    old: OldPolicyScores,
    *,
    groups: int,
    group_size: int,
    algorithm: AlgorithmConfig,
    train: TrainConfig,
    step: int,
    guard: NonFiniteGuard,
    last_checkpoint: str | None,
) -> tuple[list[dict[str, float]], int]:
    """One optimizer step per mini-batch (`minibatch_rows`); each data-parallel rank
    trains on its share of the mini-batch's rows. Returns (each update's metrics, how
    many updates the policy skipped as non-finite)."""
    updates: list[dict[str, float]] = []
    skipped = 0
    mask = old.batch.response_mask
    for rows in minibatch_rows(groups, group_size, train, step):
        share = rows[policy.dp_rank :: policy.dp_size]
        selection = minibatch_selection(algorithm, old.entropy, mask, rows)
        mini = old.batch if selection is None else with_fields(old.batch, selection=selection)
        m = policy.train_step(mini.rows(share), algorithm)
        updates.append(m)
        skipped += guard.record(m, step, last_checkpoint)
    return updates, skipped
