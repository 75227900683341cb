"""Entry point of a `KillablePool` worker:
`python -m archer_mcore.rewards.reward_worker FD OPTIONS_JSON PARENT_PID`.

The worker is a fresh interpreter (not a multiprocessing child: spawn/forkserver would
re-import the trainer's `__main__` script). It talks to the pool over the inherited
socket FD with `multiprocessing.connection` framing: receives `(fn, args)` pickles,
replies `(status, payload)`. It caps its own address space, dies when its parent
dies (`_die_with_parent`), and imports the preload modules before announcing "ready".
"""

from __future__ import annotations

import ctypes
import json
import os
import resource
import signal
import sys
import threading
import time
import traceback
from multiprocessing.connection import Connection
from typing import Any


def serve(conn: Connection) -> None:
    while True:
        try:
            fn, args = conn.recv()
        except (EOFError, OSError):  # the pool closed the socket or died
            return
        try:
            reply: tuple[str, Any] = ("ok", fn(*args))
        except MemoryError:
            reply = ("out_of_memory", "MemoryError")
        except BaseException as err:  # the call failed; the worker carries on
            reply = ("error", f"{type(err).__name__}: {err}\n{traceback.format_exc(limit=5)}")
        try:
            conn.send(reply)
        except MemoryError:
            conn.send(("out_of_memory", "MemoryError while sending the result"))
        except Exception as err:  # e.g. an unpicklable return value
            conn.send(("error", f"could not send the result: {type(err).__name__}: {err}"))


PR_SET_PDEATHSIG = 1


def _die_with_parent(parent: int, poll_s: float = 0.5) -> None:
    """Die when the pool's process `parent` dies, even mid-call.

    The kernel sends SIGKILL on the parent's death (PR_SET_PDEATHSIG), which stops a
    call stuck in C code holding the GIL; the pool starts workers from a thread that
    lives as long as its process, since the signal follows the starting thread. A
    parent that died before the prctl is caught by the getppid() check. Where prctl
    is unavailable, a watchdog thread polls getppid() instead (it cannot interrupt a
    call that holds the GIL).
    """
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        ok = libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) == 0
    except (OSError, AttributeError):
        ok = False
    if os.getppid() != parent:
        os._exit(0)
    if ok:
        return

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(poll_s)
        os._exit(0)

    threading.Thread(target=watch, name="parent-watchdog", daemon=True).start()


def main() -> None:
    fd = int(sys.argv[1])
    options = json.loads(sys.argv[2])
    _die_with_parent(int(sys.argv[3]))
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is for the trainer
    conn = Connection(fd)
    if options.get("memory_mb"):
        limit = int(options["memory_mb"]) * 1024 * 1024
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    for module in options.get("preload", []):
        __import__(module)
    conn.send(("ready", None))
    serve(conn)


if __name__ == "__main__":
    main()
