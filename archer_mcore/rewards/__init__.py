"""Verifiable rewards: math (math-verify), code (sandboxed execution), a registry and a
batch scorer for the trainer.

    scorer = RewardScorer.from_config(cfg.rewards)
    results = scorer.score_batch([RewardRequest(response, ground_truth, data_source)])
    metrics = batch_metrics(results) | scorer.counters()
"""

from archer_mcore.rewards.registry import RewardKind, RewardRegistry, default_registry
from archer_mcore.rewards.sandbox import Sandbox, SandboxLimits, SandboxUnavailableError
from archer_mcore.rewards.scorer import RewardScorer, batch_metrics
from archer_mcore.rewards.types import REWARD_FAULTS, RewardRequest, RewardResult

__all__ = [
    "REWARD_FAULTS",
    "RewardKind",
    "RewardRegistry",
    "RewardRequest",
    "RewardResult",
    "RewardScorer",
    "Sandbox",
    "SandboxLimits",
    "SandboxUnavailableError",
    "batch_metrics",
    "default_registry",
]
