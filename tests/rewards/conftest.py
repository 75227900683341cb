"""Fixtures for reward tests.

`worker_pythonpath`: reward workers are fresh interpreters that import this
directory's helpers.

`nothing_left_behind` (autouse, per test module): the reward and sandbox code must
leave no process and no temporary directory behind. Each module runs with the
system temp directory pointed at a private one (tempfile and TMPDIR for child
processes), so concurrent runs elsewhere on the machine do not interfere; afterwards
that directory must be empty, and no process this test process started (by process
tree) or a sandboxed run of it may still be running (by uid: the sandbox derives its
uids from the pid of the process that runs it).
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

HERE = Path(__file__).resolve().parent
#: base_uid values the tests and the scorer's default sandbox use.
SANDBOX_BASE_UIDS = (100_000, 300_000, 310_000)
GRACE_S = 5.0


@pytest.fixture
def worker_pythonpath(monkeypatch: pytest.MonkeyPatch) -> None:
    """Reward workers are fresh interpreters: let them import this directory's helpers."""
    old = os.environ.get("PYTHONPATH", "")
    monkeypatch.setenv("PYTHONPATH", f"{HERE}{os.pathsep}{old}" if old else str(HERE))


def _running(proc: psutil.Process) -> bool:
    try:
        return proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def _sandbox_uid_processes(pid: int) -> list[psutil.Process]:
    """Running processes with a uid `Sandbox` hands out in process `pid` (see
    `archer_mcore.rewards.sandbox._next_uid`)."""
    starts = [base + (pid % 4000) * 1000 for base in SANDBOX_BASE_UIDS]
    found = []
    for proc in psutil.process_iter(["uids"]):
        uid = proc.info["uids"].real if proc.info["uids"] else -1
        if any(s <= uid < s + 1000 for s in starts) and _running(proc):
            found.append(proc)
    return found


def _cmdline(proc: psutil.Process) -> str:
    try:
        return " ".join(proc.cmdline()[:4])
    except psutil.Error:
        return "?"


@pytest.fixture(scope="module", autouse=True)
def nothing_left_behind(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    tmp_path_factory.getbasetemp()  # pytest's own temp root stays where it is
    private = tempfile.mkdtemp(prefix="archer-rewards-tests-")
    os.chmod(private, 0o755)  # sandboxed uids may need to traverse it (no mount ns)
    saved_tempdir, saved_env = tempfile.tempdir, os.environ.get("TMPDIR")
    tempfile.tempdir = private
    os.environ["TMPDIR"] = private
    me = psutil.Process()
    before = {p.pid for p in me.children(recursive=True)}
    try:
        yield
    finally:
        tempfile.tempdir = saved_tempdir
        if saved_env is None:
            os.environ.pop("TMPDIR", None)
        else:
            os.environ["TMPDIR"] = saved_env

    def leftovers() -> tuple[list[psutil.Process], list[str]]:
        procs = [p for p in me.children(recursive=True) if p.pid not in before and _running(p)]
        procs += _sandbox_uid_processes(os.getpid())
        return procs, sorted(os.listdir(private))

    deadline = time.monotonic() + GRACE_S
    while any(leftovers()) and time.monotonic() < deadline:
        time.sleep(0.1)
    procs, dirs = leftovers()
    described = [(p.pid, _cmdline(p)) for p in procs if _running(p)]
    for p in procs:  # clean up, then report
        if _running(p):
            p.kill()
    shutil.rmtree(private, ignore_errors=True)
    problems = []
    if described:
        problems.append(f"processes left running after the module: {described}")
    if dirs:
        problems.append(f"temporary files left after the module: {dirs}")
    assert not problems, "; ".join(problems)
