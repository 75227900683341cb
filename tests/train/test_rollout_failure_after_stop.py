"""A rollout that fails after this rank received a stop signal is the step's dropped
rollout, not a crash: Slurm's pre-emption SIGTERM reaches the rollout servers too (every
process of the job), so the in-flight generation fails while the trainer is stopping.
Without a stop signal the failure is raised as before. Under real Slurm and SGLang (a
colocated job requeued with `scontrol requeue`): tests/cluster/test_rehearsal.py."""

from __future__ import annotations

import os
import signal
from types import SimpleNamespace

import pytest

from archer_mcore.rollout.types import RolloutError
from archer_mcore.train.collect import generate_scored_groups
from archer_mcore.train.progress import PhaseTimer
from archer_mcore.train.signals import StopRequest, stop_requested


class DeadEngine:
    """An engine whose servers are gone: every generate fails as SGLangEngine's does."""

    calls = 0

    def generate(self, prompt_ids, n, params):
        DeadEngine.calls += 1
        raise RolloutError("sample (prompt 0, sample 0) failed after 4 attempts: servers down")


def _components() -> SimpleNamespace:
    prompts = SimpleNamespace(next_batch=lambda k: [SimpleNamespace(prompt_ids=[1, 2])] * k)
    return SimpleNamespace(is_main=True, prompts=prompts, engine=DeadEngine(), scorer=object(),
                           tokenizer=None)  # fmt: skip


def test_without_a_stop_signal_the_failure_is_raised() -> None:
    with StopRequest(), pytest.raises(RolloutError, match="servers down"):
        generate_scored_groups(_components(), 2, n=4, params=None, timer=PhaseTimer())


def test_after_a_stop_signal_the_rollout_is_dropped(caplog: pytest.LogCaptureFixture) -> None:
    with StopRequest():
        os.kill(os.getpid(), signal.SIGTERM)  # the handler sets the flag
        assert stop_requested()
        groups = generate_scored_groups(_components(), 2, n=4, params=None, timer=PhaseTimer())
    assert groups == []
    assert "rollout failed after a stop signal, dropped" in caplog.text
    assert not stop_requested()  # outside the StopRequest: no stop
