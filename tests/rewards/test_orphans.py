"""Nothing a reward starts outlives the trainer (issue 14, items 8 and 9).

A scorer runs in a child process (standing in for the trainer) and is SIGKILLed while
its reward is still running: a sandboxed program that sleeps (no CPU use, so its CPU
limit would never fire) or a math worker stuck in one long C call on a pathological
answer (holding the GIL, so no Python-level watchdog can run). Every process the
scorer started must be gone within a few seconds, and the sandbox's temporary
directory removed.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import psutil
import pytest

from archer_mcore.rewards.sandbox import probe_isolation

pytestmark = [pytest.mark.timeout(120), pytest.mark.slow]

GONE_WITHIN_S = 5.0


def _alive(proc: psutil.Process) -> bool:
    """Running (a zombie holds no resources and waits only for its reaper)."""
    try:
        return proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def _start_trainer(source: str, tmp: Path) -> subprocess.Popen[str]:
    env = dict(os.environ, TMPDIR=str(tmp))
    return subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(source)],
        env=env,
        stdout=subprocess.PIPE,
        text=True,
    )


def _wait_for(predicate, timeout_s: float) -> bool:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def _kill_and_check(trainer: subprocess.Popen[str], started: list[psutil.Process]) -> None:
    os.kill(trainer.pid, signal.SIGKILL)
    trainer.wait()
    _wait_for(lambda: not any(_alive(p) for p in started), GONE_WITHIN_S)
    survivors = [(p.pid, p.cmdline()[:4]) for p in started if _alive(p)]
    for p in started:  # the test itself leaves nothing behind, even when it fails
        if _alive(p):
            p.kill()
    assert not survivors, survivors


def test_sleeping_sandboxed_program_dies_with_the_trainer(tmp_path: Path) -> None:
    if not probe_isolation().net:
        pytest.skip("no network namespace on this machine; the sandbox refuses to run")
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    trainer = _start_trainer(
        """
        from archer_mcore.rewards import RewardRequest, RewardScorer, SandboxLimits
        scorer = RewardScorer(num_workers=1, code_limits=SandboxLimits(wall_s=120, cpu_s=120))
        program = "```python\\nimport time\\ntime.sleep(120)\\n```"
        request = RewardRequest(program, {"inputs": [""], "outputs": ["1"]}, "apps")
        print("scoring", flush=True)
        print(scorer.score_batch([request]))
        """,
        tmp,
    )
    try:
        assert trainer.stdout is not None and trainer.stdout.readline() == "scoring\n"
        root = psutil.Process(trainer.pid)

        def program_sleeping() -> bool:
            # launcher (root), supervisor (root), the program (the run's uid)
            kids = root.children(recursive=True)
            return any(p.uids().real != 0 for p in kids if _alive(p))

        assert _wait_for(program_sleeping, 30), root.children(recursive=True)
        started = root.children(recursive=True)
        assert len(started) == 3, started
        assert list(tmp.iterdir()), "the run's directory should exist"
        _kill_and_check(trainer, started)
        assert _wait_for(lambda: not any(tmp.iterdir()), GONE_WITHIN_S), list(tmp.iterdir())
    finally:
        trainer.kill()
        trainer.wait()


@pytest.mark.parametrize("answer", ["1e999999999", "9^{9^{9^{9}}}"])
def test_stuck_math_worker_dies_with_the_trainer(tmp_path: Path, answer: str) -> None:
    trainer = _start_trainer(
        f"""
        from archer_mcore.rewards import RewardRequest, RewardScorer
        # no timeout to speak of: only the trainer's death can stop the worker
        scorer = RewardScorer(num_workers=1, process_timeout_s=600, math_strict_answer_form=False)
        request = RewardRequest("\\\\boxed{{{answer}}}", "5", "gsm8k")
        print("scoring", flush=True)
        print(scorer.score_batch([request]))
        """,
        tmp_path,
    )
    try:
        assert trainer.stdout is not None and trainer.stdout.readline() == "scoring\n"
        root = psutil.Process(trainer.pid)

        def worker_busy() -> bool:
            # importing math_verify takes about 0.5 CPU seconds: past 2.5 s it is
            # inside the call
            kids = [p for p in root.children(recursive=True) if _alive(p)]
            return any(sum(p.cpu_times()[:2]) > 2.5 for p in kids)

        assert _wait_for(worker_busy, 60), root.children(recursive=True)
        started = root.children(recursive=True)
        assert len(started) == 1, started
        _kill_and_check(trainer, started)
    finally:
        trainer.kill()
        trainer.wait()
