"""KillablePool: hard timeouts, crash/OOM recovery, use from many threads."""

from __future__ import annotations

import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import reward_test_helpers as h

from archer_mcore.rewards.process_pool import KillablePool

pytestmark = [pytest.mark.timeout(120), pytest.mark.usefixtures("worker_pythonpath")]


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # a zombie not yet reaped still answers kill(0): check its state
    with open(f"/proc/{pid}/stat") as f:
        return f.read().split(")")[-1].split()[0] != "Z"


def test_ok_error_and_worker_reuse() -> None:
    with KillablePool(1, memory_mb=512) as pool:
        first = pool.run(h.my_pid, (), timeout_s=30)
        assert first.status == "ok" and first.value != os.getpid()
        assert pool.run(h.add, (2, 3), timeout_s=30).value == 5
        err = pool.run(h.raise_value_error, (), timeout_s=30)
        assert err.status == "error" and "ValueError: bad reward" in err.error
        # an exception does not cost the worker
        assert pool.run(h.my_pid, (), timeout_s=30).value == first.value


def test_timeout_kills_the_worker_and_a_fresh_one_serves_the_next_call() -> None:
    with KillablePool(1, memory_mb=512) as pool:
        pid = pool.run(h.my_pid, (), timeout_s=30).value
        start = time.monotonic()
        out = pool.run(h.hang, (), timeout_s=0.5)
        assert out.status == "timeout"
        assert time.monotonic() - start < 5
        assert not _alive(pid)
        again = pool.run(h.my_pid, (), timeout_s=30)
        assert again.status == "ok" and again.value != pid


def test_memory_hog_and_hard_crash_are_reported_and_recovered() -> None:
    with KillablePool(1, memory_mb=512) as pool:
        assert pool.run(h.hog_memory, (), timeout_s=30).status == "out_of_memory"
        crash = pool.run(h.die, (), timeout_s=30)
        assert crash.status == "crashed" and "exit code 3" in crash.error
        assert pool.run(h.add, (1, 1), timeout_s=30).value == 2


def test_runs_from_worker_threads_concurrently() -> None:
    """Four 1 s calls on two workers from four threads take ~2 s, not 4 s; a hang in
    one thread's call does not block the others."""
    with KillablePool(2, memory_mb=512) as pool:
        # start both workers first so the timing measures the calls only
        with ThreadPoolExecutor(2) as ex:
            list(ex.map(lambda _: pool.run(h.add, (0, 0), timeout_s=60), range(2)))
        assert threading.current_thread() is threading.main_thread()
        start = time.monotonic()
        with ThreadPoolExecutor(4) as ex:
            outs = list(ex.map(lambda i: pool.run(h.sleep_then_return, (1.0, i), 30), range(4)))
        elapsed = time.monotonic() - start
        assert [o.value for o in outs] == [0, 1, 2, 3]
        assert elapsed < 3.8, elapsed  # serial would be >= 4 s
        with ThreadPoolExecutor(2) as ex:
            hung = ex.submit(pool.run, h.hang, (), 1.0)
            fine = ex.submit(pool.run, h.add, (4, 5), 60)
            assert fine.result().value == 9
            assert hung.result().status == "timeout"


def test_close_leaves_no_worker_behind() -> None:
    pool = KillablePool(2, memory_mb=512)
    pids = [pool.run(h.my_pid, (), timeout_s=30).value for _ in range(2)]
    pool.close()
    assert not any(_alive(p) for p in pids)
    with pytest.raises(RuntimeError, match="closed"):
        pool.run(h.add, (1, 2), timeout_s=1)


def test_a_worker_outlives_the_thread_that_first_used_it() -> None:
    """Workers die with the pool's process (PR_SET_PDEATHSIG), and that signal follows
    the thread that started them: started from a caller's short-lived thread, a
    worker would be killed when that thread ends. The pool starts them from its own
    long-lived thread, so the worker serves the next call."""
    with KillablePool(1, memory_mb=512) as pool:
        seen: list[object] = []
        t = threading.Thread(target=lambda: seen.append(pool.run(h.my_pid, (), timeout_s=30)))
        t.start()
        t.join()
        [first] = seen
        assert first.status == "ok"  # type: ignore[attr-defined]
        time.sleep(0.5)  # a parent-death signal would have been delivered by now
        assert _alive(first.value)  # type: ignore[attr-defined]
        again = pool.run(h.my_pid, (), timeout_s=30)
        assert again.status == "ok" and again.value == first.value  # type: ignore[attr-defined]
