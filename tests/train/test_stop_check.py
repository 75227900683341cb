"""`StopCheck`: the stop decision at phase boundaries (train/signals.py). The real
trainer under signals is tests/train/test_stop_at_phase_boundaries.py; these pin down
the agreement's contract: one collective per boundary until the first True, then
True without another (every rank saw that True at the same call), and a stop before
the update raising StepAbandoned with the step and the phase."""

from __future__ import annotations

import os
import signal

import pytest

from archer_mcore.train.signals import StepAbandoned, StopCheck, StopRequest


class FakeAgreement:
    """`any_rank` across ranks: True when this rank's flag or `others` is set."""

    def __init__(self) -> None:
        self.calls = 0
        self.others = False

    def __call__(self, flag: bool) -> bool:
        self.calls += 1
        return flag or self.others


def test_agreed_is_a_collective_until_the_first_true_then_latched() -> None:
    agree = FakeAgreement()
    with StopRequest() as request:
        stop = StopCheck(request, agree)
        assert not stop.agreed() and not stop.agreed()
        assert agree.calls == 2
        agree.others = True  # another rank received the signal
        assert stop.agreed()
        assert stop.signal_name == "signal on another rank"
        agree.others = False
        assert stop.agreed() and stop.agreed()
        assert agree.calls == 3  # no collective once agreed


def test_before_update_raises_with_the_step_and_phase_on_a_real_sigusr1() -> None:
    agree = FakeAgreement()
    with StopRequest() as request:
        stop = StopCheck(request, agree)
        stop.before_update(4, "rollout")  # no signal yet: goes on
        os.kill(os.getpid(), signal.SIGUSR1)
        with pytest.raises(StepAbandoned) as info:
            stop.before_update(4, "logprobs")
    assert (info.value.step, info.value.phase) == (4, "logprobs")
    assert stop.signal_name == "SIGUSR1"
    assert signal.getsignal(signal.SIGUSR1) is signal.SIG_DFL  # the handler is restored


def test_without_torch_distributed_the_default_agreement_is_the_local_flag() -> None:
    with StopRequest() as request:
        stop = StopCheck(request)
        assert not stop.agreed()
        os.kill(os.getpid(), signal.SIGTERM)
        assert stop.agreed()
