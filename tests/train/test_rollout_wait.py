"""The other ranks wait for rank 0's rollout on a group with its own timeout (issue 27,
item 3): `parallel.rollout_wait_timeout_s`, not the default group's
`parallel.collective_timeout_s` (NCCL's watchdog bound on a GPU job).

Two ranks under torchrun run the real trainer; the driver's ``latency`` hook makes each
generate call of rank 0's engine take 12 s (rollout/latency_engine.py), while rank 1
waits in the step's broadcast. Measured here: 2 steps in about 70 s on 2 busy cores.
"""

from __future__ import annotations

import subprocess
import sys

import pytest

LATENCY = {"per_call_s": 12.0, "per_token_s": 0.0}


def _torchrun(archer, helpers, tmp_path, *overrides: str) -> subprocess.CompletedProcess:
    out = tmp_path / "run"
    cmd = archer.command("train", [
        *helpers.FAST, "algorithm.group_filter=none", "checkpoint.save_every=0",
        f"train.output_dir={out}", *overrides,
    ])  # fmt: skip
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone",
                "--nproc_per_node", "2"]  # fmt: skip
    proc = subprocess.run(
        [*torchrun, *cmd[1:]], cwd=str(helpers.DEMO_CONFIG.parents[1]),
        env=helpers.child_env({"latency": LATENCY}), capture_output=True, text=True,
        timeout=540, start_new_session=True,
    )  # fmt: skip
    return proc


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_rollout_longer_than_the_collective_timeout_trains(archer, helpers, tmp_path):
    # before: the wait rode on the default group, which times out after 8 s here
    proc = _torchrun(
        archer, helpers, tmp_path, "train.steps=2", "parallel.collective_timeout_s=8",
        "parallel.rollout_wait_timeout_s=120",
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    rows = helpers.read_metrics(tmp_path / "run")
    assert [int(r["step"]) for r in rows] == [1, 2]
    assert all(r["time/rollout"] >= 12.0 for r in rows)  # each step did wait that long


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_a_rollout_longer_than_the_wait_bound_stops_with_the_setting_named(archer, helpers,
                                                                           tmp_path):  # fmt: skip
    proc = _torchrun(
        archer, helpers, tmp_path, "train.steps=1", "parallel.rollout_wait_timeout_s=4",
    )  # fmt: skip
    assert proc.returncode != 0
    assert "waited more than parallel.rollout_wait_timeout_s = 4 s for rank 0" in proc.stderr, (
        proc.stderr[-6000:]
    )
