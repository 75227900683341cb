"""A pool of worker processes whose calls have a hard time limit.

`concurrent.futures.ProcessPoolExecutor` cannot stop one hung call; this pool can: a
call that overruns its timeout gets its worker killed (SIGKILL) and replaced, and a
worker that dies (out of memory, segfault, `os._exit`) is replaced too. Calls never
raise for these; they return an `Outcome` that says what happened. `run` is
thread-safe and blocks its caller, so the pool is driven from a thread pool, one
thread per concurrent call (`archer_mcore.rewards.scorer`). Works from any thread:
no signals are used in the caller.

Workers are fresh interpreters (`reward_worker.py`; never a fork of a process that
has threads, e.g. torch's, and not multiprocessing's spawn, which re-runs the
trainer's `__main__`); each caps its own address space at `memory_mb` (RLIMIT_AS).

Workers die with the pool's process, even when it is SIGKILLed and the worker is
stuck in a long C call (a 10**999999999 that holds the GIL): each worker asks the
kernel for SIGKILL on its parent's death (PR_SET_PDEATHSIG). That signal follows the
*thread* that started the worker, so workers are started from one long-lived thread
of the process (`_spawn_process`), never from the short-lived caller threads.
"""

from __future__ import annotations

import contextlib
import json
import os
import queue
import socket
import subprocess
import sys
import threading
import time
import weakref
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass
from multiprocessing.connection import Connection
from typing import Any, Literal

OutcomeStatus = Literal["ok", "error", "timeout", "out_of_memory", "crashed"]


@dataclass(frozen=True)
class Outcome:
    """The result of one pool call: `value` when status is "ok", else `error` says why."""

    status: OutcomeStatus
    value: Any = None
    error: str = ""


_spawn_requests: queue.SimpleQueue[tuple[Future[subprocess.Popen[bytes]], list[str], int]] = (
    queue.SimpleQueue()
)
_spawner: tuple[int, threading.Thread] | None = None  # (pid of the process, thread)
_spawner_lock = threading.Lock()


def _spawner_loop() -> None:
    while True:
        future, argv, fd = _spawn_requests.get()
        try:
            future.set_result(subprocess.Popen(argv, pass_fds=(fd,), stdin=subprocess.DEVNULL))
        except BaseException as err:
            future.set_exception(err)


def _spawn_process(argv: list[str], fd: int) -> subprocess.Popen[bytes]:
    """Popen(argv) from this process's spawner thread, which lives as long as the
    process does, so a worker's parent-death signal fires only when the process dies."""
    global _spawner
    with _spawner_lock:
        if _spawner is None or _spawner[0] != os.getpid() or not _spawner[1].is_alive():
            thread = threading.Thread(target=_spawner_loop, name="reward-spawner", daemon=True)
            thread.start()
            _spawner = (os.getpid(), thread)
    future: Future[subprocess.Popen[bytes]] = Future()
    _spawn_requests.put((future, argv, fd))
    return future.result()


class _Worker:
    """One worker interpreter and the pool's end of its socket."""

    def __init__(self, memory_mb: int | None, preload: tuple[str, ...]) -> None:
        ours, theirs = socket.socketpair()
        options = json.dumps({"memory_mb": memory_mb, "preload": list(preload)})
        try:
            self.process = _spawn_process(
                [
                    sys.executable,
                    "-m",
                    "archer_mcore.rewards.reward_worker",
                    str(theirs.fileno()),
                    options,
                    str(os.getpid()),
                ],
                theirs.fileno(),
            )
        finally:
            theirs.close()
        self.conn = Connection(ours.detach())

    def alive(self) -> bool:
        return self.process.poll() is None

    def wait_ready(self, timeout_s: float) -> bool:
        """True once the worker has started and imported its preload modules."""
        try:
            return bool(self.conn.poll(timeout_s)) and self.conn.recv()[0] == "ready"
        except (EOFError, OSError):
            return False

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.process.wait(timeout=5)
        self.conn.close()


def _kill_all(workers: list[_Worker]) -> None:
    for w in list(workers):
        w.kill()


class KillablePool:
    """`num_workers` processes running picklable top-level functions with a deadline.

    memory_mb: address-space cap of each worker (None: unlimited).
    preload: modules each worker imports at start (e.g. "math_verify", slow to import).
    Workers start on first use; `close()` (or the context manager, or garbage
    collection, or interpreter exit) kills them.
    """

    def __init__(
        self,
        num_workers: int,
        memory_mb: int | None = 2048,
        preload: tuple[str, ...] = (),
        startup_timeout_s: float = 120.0,
    ) -> None:
        if num_workers < 1:
            raise ValueError(f"KillablePool.num_workers must be >= 1, got {num_workers}")
        self.num_workers = num_workers
        self.memory_mb = memory_mb
        self.preload = preload
        self.startup_timeout_s = startup_timeout_s
        self._idle: queue.Queue[_Worker | None] = queue.Queue()
        self._all: list[_Worker] = []
        self._lock = threading.Lock()
        self._started = False
        self._closed = False
        self._finalizer = weakref.finalize(self, _kill_all, self._all)

    def _spawn(self) -> _Worker:
        w = _Worker(self.memory_mb, self.preload)
        with self._lock:
            if not self._closed:
                self._all.append(w)
                return w
        w.kill()  # close() ran while this worker was starting
        raise RuntimeError("KillablePool is closed")

    def _retire(self, w: _Worker) -> None:
        w.kill()
        with self._lock:
            if w in self._all:
                self._all.remove(w)

    def _ensure_started(self) -> None:
        with self._lock:
            if self._closed:
                raise RuntimeError("KillablePool is closed")
            if self._started:
                return
            self._started = True
        for _ in range(self.num_workers):
            self._idle.put(None)  # a slot; the worker is spawned lazily by the first call

    def run(self, fn: Callable[..., Any], args: tuple[Any, ...], timeout_s: float) -> Outcome:
        """Call `fn(*args)` in a worker; give up (and kill the worker) after `timeout_s`."""
        self._ensure_started()
        worker = self._idle.get()
        try:
            if self._closed:
                return Outcome("crashed", error="KillablePool was closed")
            if worker is None or not worker.alive():
                if worker is not None:
                    self._retire(worker)
                worker = self._spawn()
                # Start-up and preload imports do not count against the call's timeout.
                if not worker.wait_ready(self.startup_timeout_s):
                    self._retire(worker)
                    worker = None
                    return Outcome("crashed", error="worker failed to start")
            deadline = time.monotonic() + timeout_s
            try:
                worker.conn.send((fn, args))
            except (BrokenPipeError, OSError) as err:
                self._retire(worker)
                worker = None
                return Outcome("crashed", error=f"worker pipe broken: {err}")
            if not worker.conn.poll(max(0.0, deadline - time.monotonic())):
                self._retire(worker)
                worker = None
                return Outcome("timeout", error=f"no result within {timeout_s:.1f}s")
            try:
                status, payload = worker.conn.recv()
            except (EOFError, OSError) as err:
                code: int | None = None
                with contextlib.suppress(subprocess.TimeoutExpired):
                    code = worker.process.wait(timeout=5)
                self._retire(worker)
                worker = None
                # SIGKILL from the kernel's OOM killer reads as -9.
                kind: OutcomeStatus = "out_of_memory" if code == -9 else "crashed"
                return Outcome(kind, error=f"worker died (exit code {code}): {err}")
            if status == "ok":
                return Outcome("ok", value=payload)
            return Outcome(status, error=str(payload))
        finally:
            if self._closed and worker is not None:
                self._retire(worker)
                worker = None
            self._idle.put(worker)

    def close(self) -> None:
        """Kill every worker. Calls in flight return "crashed"."""
        with self._lock:
            self._closed = True
            workers = list(self._all)
            self._all.clear()
        _kill_all(workers)

    def __enter__(self) -> KillablePool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
