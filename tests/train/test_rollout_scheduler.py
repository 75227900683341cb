"""rollout.async_steps: config refusals and the scheduler's bookkeeping (fast; the
trainer runs are in test_async_rollout.py)."""

from __future__ import annotations

import io

import pytest
import torch

from archer_mcore.config import ConfigError, config_from_dict
from archer_mcore.rollout.latency_engine import LatencyModelEngine
from archer_mcore.rollout.types import Sample, SamplingParams
from archer_mcore.train.advantage_batch import ScoredGroup
from archer_mcore.train.rollout_scheduler import (
    StalenessError,
    busy_within,
    check_staleness,
    groups_from_state,
    groups_to_state,
    overlap_metrics,
)


def _cfg(**rollout):
    return config_from_dict({"rollout": rollout})


def test_async_is_refused_where_it_cannot_work():
    with pytest.raises(ConfigError, match=r"rollout.async_steps = 1 .*colocated"):
        _cfg(async_steps=1, tis_cap=2.0)  # mode defaults to colocated
    with pytest.raises(ConfigError, match=r"colocated"):
        _cfg(async_steps=1, tis_cap=2.0, engine="sglang", mode="colocated")
    with pytest.raises(ConfigError, match=r"rollout.tis_cap"):
        _cfg(async_steps=1, mode="disaggregated")
    with pytest.raises(ConfigError, match=r"rollout.async_steps"):
        _cfg(async_steps=2, mode="disaggregated", tis_cap=2.0)
    cfg = _cfg(async_steps=1, mode="disaggregated", tis_cap=2.0)
    assert cfg.rollout.async_steps == 1
    assert _cfg().rollout.async_steps == 0


def _sample(version: int, i: int = 0, j: int = 0) -> Sample:
    return Sample(
        prompt_index=i,
        sample_index=j,
        prompt_ids=[3, 4],
        token_ids=[5, 6, 7],
        logprobs=[-0.5, -1.25, -2.0],
        finish_reason="stop",
        weight_version=version,
        request_id=f"r{i}{j}",
    )


def test_groups_survive_a_weights_only_checkpoint_round_trip():
    groups = [
        ScoredGroup([_sample(3, 0, 0), _sample(4, 0, 1)], [1.0, 0.0], "math"),
        ScoredGroup([_sample(4, 1, 0), _sample(4, 1, 1)], [0.0, 0.0], "code"),
    ]
    buf = io.BytesIO()
    torch.save({"async_pending": {"step": 5, "groups": groups_to_state(groups)}}, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=True)
    assert groups_from_state(loaded["async_pending"]["groups"]) == groups


def test_staleness_is_counted_in_updates_and_bounded():
    groups = [ScoredGroup([_sample(4), _sample(3)], [1.0, 0.0]), ScoredGroup([_sample(3)], [0.0])]
    # synced versions 3 then 4 (the trained policy): lags 0, 1, 1
    assert check_staleness(groups, [0, 3, 4], 1) == {
        "rollout/staleness_mean": pytest.approx(2 / 3),
        "rollout/staleness_max": 1.0,
    }
    # a step without an update syncs nothing: version 1 was never synced, so samples of
    # version 0 trained at policy version 2 are one update old
    assert check_staleness([ScoredGroup([_sample(0)], [0.0])], [0, 2], 1)[
        "rollout/staleness_max"
    ] == 1.0
    with pytest.raises(StalenessError, match=r"2 sample\(s\) not within 1 update.*up to 2 upd"):
        check_staleness(groups, [3, 4, 5], 1)
    with pytest.raises(StalenessError, match=r"newer than the policy: \[4\]"):
        check_staleness(groups, [2, 3], 1)
    assert check_staleness(groups, list(range(10)), None)["rollout/staleness_max"] == 6.0


def test_busy_time_and_overlap_fractions():
    # busy 1..3 and 4..6, window 2..5: 1 s + 1 s inside
    assert busy_within([(1.0, 3.0), (4.0, 6.0)], 2.0, 5.0) == pytest.approx(2.0)
    m = overlap_metrics(window_s=10.0, rollout_busy_s=6.0, trainer_idle_s=2.0)
    assert m == {
        "overlap/trainer_idle_s": 2.0,
        "overlap/rollout_idle_s": 4.0,
        "overlap/trainer_idle_fraction": pytest.approx(0.2),
        "overlap/rollout_idle_fraction": pytest.approx(0.4),
        "overlap/fraction": pytest.approx(4.0 / 6.0),
    }
    # synchronous: the trainer idles exactly while the rollout works
    assert overlap_metrics(5.0, 3.0, 3.0)["overlap/fraction"] == 0.0


def test_latency_model_engine_sleeps_the_modelled_time_and_tracks_versions():
    eng = LatencyModelEngine(per_token_s=0.002, per_call_s=0.05, vocab_size=20, seed=1)
    params = SamplingParams(max_new_tokens=10, stop_token_ids=(0, 1))
    batch = eng.generate([[2, 3], [4]], 3, params)
    version, tokens, seconds = eng.calls[-1]
    assert tokens == sum(len(s.token_ids) for g in batch for s in g)
    assert 5 * 3 * 2 <= tokens <= 10 * 3 * 2
    assert seconds >= 0.05 + 0.002 * tokens
    assert all(t not in (0, 1) for g in batch for s in g for t in s.token_ids)
    assert version == 0 and {s.weight_version for g in batch for s in g} == {0}
    consumed = []
    eng.update_weights(iter([[("w", torch.ones(2))]]), version=7)
    eng.update_weights([("w", torch.ones(2))] for _ in range(2) if not consumed.append(1))
    assert consumed == [1, 1] and eng.weight_version == 8  # the export ran to its end
    assert {s.weight_version for g in eng.generate([[2]], 2, params) for s in g} == {8}
    # the sampler state round-trips: same tokens again
    state = eng.rng_state()
    a = eng.generate([[2]], 2, params)
    eng.set_rng_state(state)
    assert eng.generate([[2]], 2, params) == a


def test_both_schedulers_implement_the_rollout_scheduler_protocol():
    """The loop is typed against `RolloutScheduler`; each scheduler has every member it
    declares, with the same parameters (names, kinds, defaults)."""
    import inspect

    from archer_mcore.train.protocols import RolloutScheduler
    from archer_mcore.train.rollout_scheduler import AsyncRollout, SyncRollout

    members = [
        name for name, value in vars(RolloutScheduler).items()
        if callable(value) and not name.startswith("_")
    ]  # fmt: skip
    assert {"collect", "sync_weights", "checkpoint_state", "close"} <= set(members)
    for cls in (SyncRollout, AsyncRollout):
        for name in members:
            want = inspect.signature(getattr(RolloutScheduler, name)).parameters
            got = inspect.signature(getattr(cls, name)).parameters
            shape = [(p.name, p.kind, p.default) for p in want.values()]
            assert [(p.name, p.kind, p.default) for p in got.values()] == shape, (cls, name)
        assert isinstance(cls.async_steps, int)
        init = inspect.signature(cls.__init__)  # `synced` is set by the constructor
        assert "start" in init.parameters
