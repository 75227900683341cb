"""Stop requests: Ctrl-C, SIGTERM (Slurm pre-emption), SIGUSR1 (Slurm's --signal).

The handlers only set a flag (`StopRequest`). The loop asks `StopCheck` at every phase
boundary of a step whether any rank has a stop request; the answer is agreed by all
ranks (one all-reduce over the control group), so every rank stops at the same
boundary. Before a step's update a stop drops the step (`StepAbandoned`) and the run
saves the state after the previous step; after the update it saves the step at once,
without the weight sync (train/loop.py, `train`). A second Ctrl-C aborts at once.
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Callable
from types import FrameType

from archer_mcore.parallel.ranks import any_rank

#: The StopRequest in use (inside its `with`), for `stop_requested`.
_ACTIVE: list[StopRequest] = []


def stop_requested() -> bool:
    """Whether this process received a stop signal (the active StopRequest's flag;
    False outside one). Local to the rank: the decision to stop is `StopCheck`'s."""
    return bool(_ACTIVE) and bool(_ACTIVE[-1])


class StopRequest:
    """Installs handlers for SIGINT, SIGTERM and SIGUSR1 while in use (a context)."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1)

    def __init__(self) -> None:
        self.signal_name: str | None = None
        self._event = threading.Event()
        self._previous: dict[int, object] = {}

    def __bool__(self) -> bool:
        return self._event.is_set()

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self._event.is_set() and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.signal_name = signal.Signals(signum).name
        self._event.set()

    def __enter__(self) -> StopRequest:
        if threading.current_thread() is threading.main_thread():
            for s in self.SIGNALS:
                self._previous[s] = signal.signal(s, self._handle)
        _ACTIVE.append(self)
        return self

    def __exit__(self, *exc: object) -> None:
        for s, prev in self._previous.items():
            signal.signal(s, prev)  # type: ignore[arg-type]
        self._previous.clear()
        if self in _ACTIVE:
            _ACTIVE.remove(self)


class StepAbandoned(Exception):
    """Every rank agreed to stop before step `step`'s update began: the step's rollout
    is dropped and the run saves the state after step `step` - 1. `phase`: the phase
    that had just ended (e.g. "rollout" for a generation batch, "logprobs")."""

    def __init__(self, step: int, phase: str) -> None:
        super().__init__(f"stop requested before the update of step {step} (after {phase})")
        self.step, self.phase = step, phase


class StopCheck:
    """The stop decision at phase boundaries, agreed by every rank.

    `agreed()` is a collective (`agree`, by default `parallel.ranks.any_rank`: an
    all-reduce over the gloo control group): every rank must call it at the same
    boundaries, which the loop's phases guarantee (every rank runs every phase; the
    non-zero ranks wait for rank 0's generation batches in the broadcast of its groups).
    A signal that reached only some ranks, or reached them at different times, thus
    stops all of them at the same boundary. Once True it stays True without another
    collective (every rank saw the same True at the same call).
    """

    def __init__(self, request: StopRequest, agree: Callable[[bool], bool] = any_rank) -> None:
        self.request = request
        self._agree = agree
        self._agreed = False

    def agreed(self) -> bool:
        """Whether any rank has a stop request (collective until the first True)."""
        if not self._agreed:
            self._agreed = self._agree(bool(self.request))
        return self._agreed

    def before_update(self, step: int, phase: str) -> None:
        """A boundary before step `step`'s update: raises StepAbandoned when agreed."""
        if self.agreed():
            raise StepAbandoned(step, phase)

    @property
    def signal_name(self) -> str:
        """The signal this rank received, or a note that another rank received it."""
        return self.request.signal_name or "signal on another rank"
