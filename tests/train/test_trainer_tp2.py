"""The demo config with tensor parallelism 2 under torchrun (2 processes, gloo): rank 0
does rollouts, rewards and metrics, both ranks hold half of every layer."""

from __future__ import annotations

import subprocess
import sys

import pytest

from archer_mcore.actor.checkpoint_store import verify_checkpoint


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_tp2_under_torchrun_matches_tp1(archer, helpers, reference_run, tmp_path):
    out = tmp_path / "tp2"
    overrides = [
        *helpers.REFERENCE,
        "train.steps=2",
        "eval.every=0",
        "parallel.tensor_model_parallel_size=2",
        f"train.output_dir={out}",
    ]
    cmd = archer.command("train", overrides)
    torchrun = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        "2",
    ]
    proc = subprocess.run(
        [*torchrun, *cmd[1:]],
        cwd=str(helpers.DEMO_CONFIG.parents[1]),
        env=helpers.child_env(),
        capture_output=True,
        text=True,
        timeout=360,
        start_new_session=True,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]

    # Rank 0 alone reports: one line and one metrics row per step.
    assert proc.stdout.count("step 1/") == 1 and proc.stdout.count("step 2/") == 1
    rows = helpers.read_metrics(out)
    assert [int(r["step"]) for r in rows] == [1, 2]
    manifest = verify_checkpoint(out / "checkpoints" / "step_00000002")
    assert (manifest["tp"], manifest["pp"], manifest["world_size"]) == (2, 1, 2)
    assert len(list((out / "checkpoints" / "step_00000002" / "rng").iterdir())) == 2

    # Step 1 samples from the same warm-started weights as the TP=1 reference run: the
    # same rollouts and rewards exactly; the sharded forward/backward agrees up to
    # float32 reduction order.
    ref = helpers.read_metrics(reference_run)[0]
    got = rows[0]
    for key in ("reward/mean", "reward/accuracy", "response/length_mean"):
        assert got[key] == ref[key], key
    for key in ("entropy/all", "entropy/knowledge", "entropy/reasoning", "train/loss"):
        assert got[key] == pytest.approx(ref[key], rel=1e-4, abs=1e-6), key
    assert got["train/grad_norm"] == pytest.approx(ref["train/grad_norm"], rel=1e-3)
