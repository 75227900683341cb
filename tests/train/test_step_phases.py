"""The RL step's named phases in isolation: the mini-batch schedule, the non-finite
guard, and the Protocols the loop is written against (the concrete classes provide
every member the loop calls)."""

from __future__ import annotations

import inspect
import math

import pytest
import torch

from archer_mcore.config import config_from_dict
from archer_mcore.train.update import NonFiniteGuard, NonFiniteLossError, minibatch_rows


def _train_cfg(**kw):
    return config_from_dict({"train": kw}).train


def test_minibatch_rows_covers_each_group_once_per_epoch():
    """5 groups kept of 8 prompts, 4 per mini-batch: 8 // 4 = 2 mini-batches per epoch
    of ceil(5 / 2) = 3 and 2 groups; n = 2 rows per group; two epochs."""
    t = _train_cfg(prompts_per_step=8, mini_batch_prompts=4, ppo_epochs=2, seed=3)
    batches = list(minibatch_rows(5, 2, t, step=7))
    assert [len(b) for b in batches] == [6, 4, 6, 4]
    for epoch in range(2):
        rows = torch.cat(batches[2 * epoch : 2 * epoch + 2])
        assert sorted(rows.tolist()) == list(range(10))  # every row of every group once
        groups = (rows[::2] // 2).tolist()
        assert (rows[1::2] - rows[::2]).tolist() == [1] * 5  # whole groups, rows adjacent
        # The order is the permutation of the generator seeded by seed, step and epoch.
        g = torch.Generator().manual_seed(3 * 1_000_003 + 7 * 101 + epoch)
        assert groups == torch.randperm(5, generator=g).tolist()


def test_minibatch_rows_one_group_per_batch_when_few_are_kept():
    t = _train_cfg(prompts_per_step=8, mini_batch_prompts=2, ppo_epochs=1)
    assert [len(b) for b in minibatch_rows(2, 4, t, step=1)] == [4, 4]  # min(2 groups, 4)


def test_nonfinite_guard_counts_runs_and_stops_at_the_limit():
    guard = NonFiniteGuard(limit=2)
    assert guard.record({"loss": 0.5}, 1, None) is False
    assert guard.record({"loss": math.nan}, 1, None) is True
    assert guard.record({"loss": 0.1}, 1, None) is False  # a finite update resets the run
    assert guard.record({"loss": 0.1, "update_skipped": 1.0}, 2, None) is True
    with pytest.raises(NonFiniteLossError, match=r"2 non-finite updates in a row at step 3.*ck"):
        guard.record({"loss": math.inf}, 3, "ck")


def _members(protocol: type) -> dict[str, object]:
    """The protocol's own members (attributes, properties, methods), dunders aside."""
    own = {k: v for k, v in vars(protocol).items() if not k.startswith("_")}
    for name in getattr(protocol, "__annotations__", {}):
        own.setdefault(name, None)
    return own


def _check(protocol: type, concrete: type) -> None:
    for name, member in _members(protocol).items():
        assert (
            hasattr(concrete, name)
            or name in getattr(concrete, "__annotations__", {})
            or (
                name == "reference"  # an instance attribute set in __init__
                and "self.reference" in inspect.getsource(concrete.__init__)
            )
        ), f"{concrete.__name__} lacks {protocol.__name__}.{name}"
        if inspect.isfunction(member):
            want = list(inspect.signature(member).parameters)
            have = list(inspect.signature(getattr(concrete, name)).parameters)
            assert have[: len(want)] == want, (concrete.__name__, name, have, want)


def test_concrete_parts_provide_the_protocols():
    from archer_mcore.actor.policy import MegatronPolicy
    from archer_mcore.actor.protocol import Policy
    from archer_mcore.metrics.exporter import MetricsExporter
    from archer_mcore.rewards.scorer import RewardScorer
    from archer_mcore.rollout.local_engine import LocalEngine
    from archer_mcore.train import protocols

    _check(Policy, MegatronPolicy)
    _check(protocols.SamplingRngOwner, LocalEngine)
    _check(protocols.RewardScorer, RewardScorer)
    _check(protocols.MetricsSink, MetricsExporter)
