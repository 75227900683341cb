"""Pre-emption: SIGTERM (Slurm) or Ctrl-C writes a checkpoint and exits 0 promptly;
`archer train --resume` continues from it and ends exactly where an uninterrupted run
ends: the same prompts in the same order, the same sampled responses, the same metrics
and bit-identical final weights (CPU runs are deterministic)."""

from __future__ import annotations

import contextlib
import json
import re
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch

from archer_mcore.metrics.keys import WALL_CLOCK_PREFIXES

# Wall-clock and throughput entries differ between any two runs.
VOLATILE = WALL_CLOCK_PREFIXES


def _trace(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def _interrupt_after(proc, step_line: str, sig: int, timeout: float = 240.0):
    """Read the run's stdout until `step_line` starts a line, then send `sig` to the
    trainer process; returns (stdout, stderr, seconds from the signal to the exit)."""
    lines = []
    deadline = time.monotonic() + timeout
    sent_at = None
    for line in proc.stdout:
        lines.append(line)
        if sent_at is None and line.startswith(step_line):
            proc.send_signal(sig)
            sent_at = time.monotonic()
        if time.monotonic() > deadline:
            break
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=max(1.0, deadline - time.monotonic()))
    err = proc.stderr.read()
    assert sent_at is not None, "".join(lines) + err[-4000:]
    return "".join(lines), err, time.monotonic() - sent_at


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_sigterm_checkpoints_and_resume_matches_uninterrupted_run(
    archer, helpers, reference_run, tmp_path
):
    n = helpers.REFERENCE_STEPS
    out = tmp_path / "run"
    overrides = [*helpers.REFERENCE, f"train.output_dir={out}"]
    hooks = {"trace": str(out / "trace.jsonl")}

    proc = archer.popen("train", overrides, hooks=hooks)
    try:
        stdout, stderr, exit_s = _interrupt_after(proc, f"step 2/{n} ", signal.SIGTERM)
    finally:
        helpers.kill_group(proc)
    assert proc.returncode == 0, stderr[-4000:]
    # The signal lands during step 3 (step 2 had already reported). At the next phase
    # boundary the run stops: before step 3's update, step 3 is dropped and step 2 saved;
    # once the update has begun, step 3 is saved (tests/train/test_stop_at_phase_boundaries.py
    # pins each case down).
    m = re.search(r"received SIGTERM: checkpoint written at step (\d+)", stdout)
    assert m, stdout
    k = int(m.group(1))
    assert 2 <= k < n, stdout
    dropped = f"step {k + 1} dropped before its update" in stdout
    assert exit_s < 60, f"took {exit_s:.0f}s to exit after SIGTERM"
    root = out / "checkpoints"
    assert (root / "latest").read_text().strip() == f"step_{k:08d}"
    assert [int(r["step"]) for r in helpers.read_metrics(out)] == list(range(1, k + 1))

    resumed = archer.run("train", overrides, "--resume", hooks=hooks)
    assert resumed.returncode == 0, resumed.stderr[-4000:]
    assert f"resumed from {root / f'step_{k:08d}'} (step {k})" in resumed.stdout

    # Same prompts in the same order and the same sampled tokens, call by call.
    ref_trace, trace = _trace(reference_run / "trace.jsonl"), _trace(out / "trace.jsonl")
    if dropped:  # the dropped step's rollout, redone alike by the resumed run
        assert trace[k] == trace[k + 1]
        del trace[k]
    assert len(trace) == len(ref_trace) >= n
    for i, (a, b) in enumerate(zip(ref_trace, trace)):
        assert a["prompts"] == b["prompts"], f"rollout call {i}: different prompts"
        assert a["responses"] == b["responses"], f"rollout call {i}: different samples"

    # Every step's metrics (rewards, losses, KL, clip fractions, grad norms, eval).
    ref_rows = helpers.read_metrics(reference_run)
    rows = helpers.read_metrics(out)
    assert [int(r["step"]) for r in rows] == list(range(1, n + 1))
    for a, b in zip(ref_rows, rows):
        keep = [key for key in a if not key.startswith(VOLATILE)]
        assert {key: a[key] for key in keep} == {key: b.get(key) for key in keep}, a["step"]

    # Bit-identical final weights.
    final = f"step_{n:08d}"
    ref_w = helpers.model_weights(helpers.checkpoint(reference_run / "checkpoints" / final))
    w = helpers.model_weights(helpers.checkpoint(root / final))
    assert ref_w.keys() == w.keys() and len(w) > 5
    for key in ref_w:
        assert torch.equal(ref_w[key], w[key]), key


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_ctrl_c_to_the_process_group_checkpoints_and_exits_0(archer, helpers, tmp_path):
    # A terminal's Ctrl-C reaches the whole foreground process group: the trainer and
    # its reward worker processes alike.
    import os

    out = tmp_path / "run"
    proc = archer.popen(
        "train",
        [*helpers.FAST, "algorithm.group_filter=none", "train.steps=6", f"train.output_dir={out}"],
    )
    try:
        lines = []
        for line in proc.stdout:
            lines.append(line)
            if line.startswith("step 1/6 "):
                os.killpg(proc.pid, signal.SIGINT)
                break
        rest, err = proc.communicate(timeout=120)
    finally:
        helpers.kill_group(proc)
    stdout = "".join(lines) + rest
    assert proc.returncode == 0, err[-4000:]
    m = re.search(r"received SIGINT: checkpoint written at step (\d+)", stdout)
    assert m, stdout + err[-3000:]
    k = int(m.group(1))
    assert k < 6
    root = out / "checkpoints"
    assert (root / "latest").read_text().strip() == f"step_{k:08d}"
    from archer_mcore.actor.checkpoint_store import verify_checkpoint

    assert verify_checkpoint(root / f"step_{k:08d}")["step"] == k
    rows = helpers.read_metrics(out)
    assert [int(r["step"]) for r in rows] == list(range(1, k + 1))
    assert rows[-1]["reward/failures"] == 0.0  # the reward workers ignored the Ctrl-C
