"""The metrics of one RL step, assembled in one place from what the phases returned.

Keys (all floats): sampling/* (group filter), reward/* and response/* (the rollout),
rollout/* (rollout/training mismatch), the update's loss metrics (train/* when the
policy's key has no group), forking/share, throughput/*, sync/bytes; the finish phase
adds eval/* and time/step, and `Components.report` the phase times time/<phase>.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from torch import Tensor

from archer_mcore.algo.rollout_correction import mismatch_metrics
from archer_mcore.metrics.repetition import mean_ngram_repetition_rate
from archer_mcore.train.advantage_batch import ScoredGroup, TrainBatch, graded_metrics
from archer_mcore.train.dynamic_sampling import SamplingOutcome
from archer_mcore.train.progress import PhaseTimer


def sampling_metrics(
    outcome: SamplingOutcome[ScoredGroup], reward_failures: int
) -> dict[str, float]:
    """What the group filter dropped, the generation batches it took, reward faults."""
    return {
        "sampling/drop_rate": outcome.drop_rate,
        "sampling/generation_batches": float(outcome.generation_batches),
        "reward/failures": float(reward_failures),
    }


def rollout_metrics(
    groups: list[ScoredGroup], generated: list[ScoredGroup], batch: TrainBatch
) -> dict[str, float]:
    """Metrics of the trained groups, except accuracy: over everything generated."""
    lengths = [len(s.token_ids) for g in groups for s in g.samples]
    count = max(1, len(lengths))
    n_generated = max(1, sum(len(g.correct) for g in generated))
    return {
        "reward/mean": float(batch.rewards.mean()),
        "reward/std": float(batch.rewards.std()) if batch.rewards.numel() > 1 else 0.0,
        "response/repetition": mean_ngram_repetition_rate(
            [s.token_ids for g in groups for s in g.samples]
        ),
        "reward/accuracy": sum(sum(g.correct) for g in generated) / n_generated,
        "reward/accuracy_trained": sum(sum(g.correct) for g in groups) / count,
        "response/length_mean": sum(lengths) / count,
        "response/length_max": float(max(lengths, default=0)),
        "response/clip_ratio": sum(s.finish_reason == "length" for g in groups for s in g.samples)
        / count,
    }


def mismatch_step_metrics(
    old_logp: Tensor, rollout_logp: Tensor, mask: Tensor, tis_cap: float | None
) -> dict[str, float]:
    """Rollout/training mismatch of the response tokens (old_logp, rollout_logp, mask:
    [B, L]): the k3 KL, the mean |log-prob difference|, and with a cap the truncated
    importance weights' mean and clipped fraction."""
    mism = mismatch_metrics(old_logp, rollout_logp, mask, tis_cap)
    diff = (old_logp - rollout_logp)[mask]
    out = {
        "rollout/mismatch_kl_k3": mism["mismatch_kl_k3"],
        "rollout/logprob_abs_diff": float(diff.abs().mean()) if diff.numel() else 0.0,
    }
    if tis_cap:
        out["rollout/tis_weight_mean"] = mism["tis_weight_mean"]
        out["rollout/tis_clipped_fraction"] = mism["tis_clipped_fraction"]
    return out


def mean_over_updates(rows: Sequence[dict[str, float]]) -> dict[str, float]:
    """Per key, the mean over the updates that report it (keys sorted)."""
    keys = sorted(set().union(*rows)) if rows else []
    return {k: sum(r[k] for r in rows if k in r) / sum(k in r for r in rows) for k in keys}


def update_step_metrics(updates: Sequence[dict[str, float]], skipped: int) -> dict[str, float]:
    """The updates' metrics averaged over the step's mini-batches (a key without a
    group becomes train/<key>), the skipped updates, and forking/share."""
    out = {k if "/" in k else f"train/{k}": v for k, v in mean_over_updates(updates).items()}
    out["train/skipped_steps"] = float(skipped)
    if "share/forking" in out:
        out["forking/share"] = out["share/forking"]
    return out


def throughput_metrics(
    batch: TrainBatch, ppo_epochs: int, generated: list[ScoredGroup], timer: PhaseTimer
) -> dict[str, float]:
    """Tokens trained (response tokens x epochs) and generated, and their rates over the
    update and rollout phases (tokens / s)."""
    trained = batch.num_response_tokens * ppo_epochs
    rollout = sum(len(s.token_ids) for grp in generated for s in grp.samples)
    return {
        "throughput/train_tokens": float(trained),
        "throughput/train_tokens_per_s": trained / max(1e-9, timer.seconds["update"]),
        "throughput/rollout_tokens": float(rollout),
        "throughput/rollout_tokens_per_s": rollout / max(1e-9, timer.seconds.get("rollout", 0.0)),
    }


@dataclass(kw_only=True)
class StepResults:
    """What the phases of one trained step returned, for `step_metrics`."""

    outcome: SamplingOutcome[ScoredGroup]
    reward_failures: int
    batch: TrainBatch
    old_logp: Tensor  # [B, L]
    tis_cap: float | None
    updates: list[dict[str, float]]
    skipped_updates: int
    ppo_epochs: int
    sync_bytes: int


def step_metrics(r: StepResults, timer: PhaseTimer) -> dict[str, float]:
    """Every metric of a trained step, in one dict (insertion order is the log order)."""
    return {
        **sampling_metrics(r.outcome, r.reward_failures),
        **rollout_metrics(r.outcome.groups, r.outcome.all_groups, r.batch),
        **graded_metrics(r.outcome.all_groups),
        **mismatch_step_metrics(
            r.old_logp, r.batch.rollout_logp, r.batch.policy.response_mask, r.tis_cap
        ),
        **update_step_metrics(r.updates, r.skipped_updates),
        **throughput_metrics(r.batch, r.ppo_epochs, r.outcome.all_groups, timer),
        "sync/bytes": float(r.sync_bytes),
    }
