"""Stop requests: Ctrl-C, SIGTERM (Slurm pre-emption), SIGUSR1 (Slurm's --signal).

The handlers only set a flag; the loop checks it between phases, writes a checkpoint
and exits cleanly. A second Ctrl-C aborts at once.
"""

from __future__ import annotations

import signal
import threading
from types import FrameType


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
        return self

    def __exit__(self, *exc: object) -> None:
        for s, prev in self._previous.items():
            signal.signal(s, prev)  # type: ignore[arg-type]
        self._previous.clear()
