"""Servers and router the trainer launches survive the stop warning (SIGUSR1) that
Slurm delivers to every process of the training step, and still stop on SIGTERM.
The whole path (a colocated job pre-empted under Slurm) is tests/cluster/test_rehearsal.py."""

from __future__ import annotations

import os
import signal
import sys
import time
from pathlib import Path

from archer_mcore.rollout.sglang_launcher import ManagedProcess

# a child with Python's default SIGUSR1 disposition (terminate), as SGLang's server has
SLEEPER = [sys.executable, "-c", "import time; print('up', flush=True); time.sleep(60)"]


def _started(tmp_path: Path) -> ManagedProcess:
    p = ManagedProcess(SLEEPER, None, tmp_path / "child.log")
    p.start()
    deadline = time.monotonic() + 30
    while "up" not in (tmp_path / "child.log").read_text():
        assert time.monotonic() < deadline and p.alive, p.log_path.read_text()
        time.sleep(0.05)
    return p


def test_a_launched_process_survives_sigusr1_to_its_process_group(tmp_path: Path) -> None:
    p = _started(tmp_path)
    try:
        # what slurmstepd does on `scancel --signal=USR1`: every process of the step
        os.killpg(p.proc.pid, signal.SIGUSR1)
        time.sleep(1.0)
        assert p.alive, f"died of SIGUSR1 (exit {p.returncode})"
        # SIGUSR1 is ignored in the program itself, not by a wrapper left in between
        with open(f"/proc/{p.proc.pid}/status") as f:
            ignored = next(int(x.split()[1], 16) for x in f if x.startswith("SigIgn:"))
        assert ignored & (1 << (signal.SIGUSR1 - 1))
        cmdline = Path(f"/proc/{p.proc.pid}/cmdline").read_bytes()
        assert cmdline.split(b"\0")[0] == sys.executable.encode()
    finally:
        p.stop(grace_s=5)
    assert p.returncode == -signal.SIGTERM  # and the trainer's own stop still works
