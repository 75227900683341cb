"""Real `archer train` runs for issue 14's checkpoint items:

1. a fresh run with --overwrite into a directory holding an earlier run's step_6 and
   step_8 keeps its own checkpoints (main deleted each one right after writing it,
   since keep-last-K kept the highest step numbers), and `latest` names one that exists;
5. --resume with a damaged newest checkpoint falls back to the newest valid one and
   says which one it skipped and why;
4. an update that leaves non-finite weights stops the run before they are synced or
   checkpointed: the last good checkpoint stays the newest.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
import torch

from archer_mcore.actor.checkpoint_store import verify_checkpoint

# Runs the CLI with one test hook: after the optimizer step of the RL steps listed in
# $POISON_STEPS, one weight is set to NaN (as a diverging update would leave it).
POISON_DRIVER = r"""
import os, sys
import torch
import archer_mcore.actor.policy as policy

steps = {int(s) for s in os.environ.get("POISON_STEPS", "").split(",") if s}
real = policy.MegatronPolicy.train_step

def train_step(self, *args, **kwargs):
    out = real(self, *args, **kwargs)
    step = sys._getframe(1).f_locals.get("step")  # the RL loop's step variable
    if step in steps:
        with torch.no_grad():
            next(self.unwrapped().parameters()).view(-1)[0] = float("nan")
        print(f"test hook: NaN weight after the update of step {step}", flush=True)
    return out

policy.MegatronPolicy.train_step = train_step
from archer_mcore.cli import main
sys.exit(main(sys.argv[1:]))
"""


def _fake_old_checkpoint(root: Path, step: int) -> None:
    d = root / f"step_{step:08d}"
    d.mkdir(parents=True)
    (d / "MANIFEST.json").write_text(json.dumps({"format_version": 1, "step": step, "files": {}}))


def _names(root: Path) -> list[str]:
    return sorted(p.name for p in root.iterdir())


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_overwrite_keeps_new_checkpoints_and_resume_skips_a_damaged_one(archer, helpers, tmp_path):
    out = tmp_path / "run"
    root = out / "checkpoints"
    _fake_old_checkpoint(root, 6)
    _fake_old_checkpoint(root, 8)
    (root / "latest").write_text("step_00000008")
    base = [
        *helpers.FAST,
        f"train.output_dir={out}",
        "checkpoint.save_every=1",
        "checkpoint.keep_last=2",
    ]
    refused = archer.run("train", [*base, "train.steps=3"])
    assert refused.returncode == 2 and "--overwrite" in refused.stderr, refused.stderr[-3000:]

    proc = archer.run("train", [*base, "train.steps=3"], "--overwrite")
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert _names(root) == ["latest", "step_00000002", "step_00000003"]
    assert (root / "latest").read_text().strip() == "step_00000003"
    for s in (2, 3):
        verify_checkpoint(root / f"step_{s:08d}")

    # Damage the newest: one flipped byte in a megatron shard (same size).
    shard = next(
        p for p in sorted((root / "step_00000003" / "dist").iterdir()) if p.suffix == ".distcp"
    )
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))

    resumed = archer.run("train", [*base, "train.steps=4"], "--resume")
    assert resumed.returncode == 0, resumed.stderr[-4000:]
    assert "--resume: skipping damaged checkpoint step_00000003" in resumed.stdout
    assert "CRC32" in resumed.stdout
    assert f"resumed from {root / 'step_00000002'} (step 2)" in resumed.stdout
    assert _names(root) == ["latest", "step_00000003", "step_00000004"]
    for s in (3, 4):
        verify_checkpoint(root / f"step_{s:08d}")  # step 3 rewritten by the resumed run
    steps = [int(r["step"]) for r in helpers.read_metrics(out)]
    assert steps == [1, 2, 3, 3, 4]  # the run's own rows only (--overwrite cleared the old)


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_non_finite_weights_stop_the_run_before_they_are_saved(archer, helpers, tmp_path):
    driver = tmp_path / "poison_driver.py"
    driver.write_text(POISON_DRIVER)
    out = tmp_path / "run"
    cmd = archer.command(
        "train",
        [
            *helpers.FAST,
            "algorithm.group_filter=none",
            "train.steps=4",
            "checkpoint.save_every=1",
            f"train.output_dir={out}",
        ],
    )
    cmd[1] = str(driver)
    env = {**helpers.child_env(), "POISON_STEPS": "2"}
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=500)
    assert "test hook: NaN weight after the update of step 2" in proc.stdout, proc.stderr[-3000:]
    assert proc.returncode == 1, proc.stderr[-4000:]
    tail = proc.stderr.split("NonFiniteParametersError")[-1]
    assert "non-finite weights after the update of step 2" in tail
    assert "step_00000001" in tail  # the last good checkpoint, named
    root = out / "checkpoints"
    assert _names(root) == ["latest", "step_00000001"]
    assert (root / "latest").read_text().strip() == "step_00000001"
    weights = helpers.model_weights(helpers.checkpoint(root / "step_00000001"))
    assert weights and all(torch.isfinite(t).all() for t in weights.values())
    assert [int(r["step"]) for r in helpers.read_metrics(out)] == [1]


def _eval_rows(cache: Path, n: int, out: Path) -> Path:
    files = sorted(cache.glob("synthetic-*-512-*/eval.jsonl"))
    assert len(files) == 1, files
    out.write_text("".join(files[0].read_text().splitlines(keepends=True)[:n]))
    return out


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_eval_reports_reward_failures_and_rejects_a_checkpoint_of_another_shape(
    archer, helpers, reference_run, tmp_path
):
    data = _eval_rows(archer.cache, 3, tmp_path / "three.jsonl")
    ckpt = str(reference_run / "checkpoints")
    # A model of another shape: a one-line error naming the checkpoint, exit 2 (main:
    # a traceback, torch's CheckpointException escaping `except Exception`).
    proc = archer.run(
        "eval",
        [*helpers.REFERENCE, "model.arch.hidden_size=32"],
        "--checkpoint",
        ckpt,
        "--data",
        str(data),
    )
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    assert "archer: config error: --checkpoint: checkpoint" in proc.stderr
    assert "could not be loaded" in proc.stderr

    # Every reward times out (a microsecond budget): accuracy 0 with the reason beside
    # it, 3 prompts x 2 samples = 6 failures.
    out = tmp_path / "eval.json"
    proc = archer.run(
        "eval",
        [*helpers.REFERENCE, "rewards.math_timeout_s=0.000001"],
        "--checkpoint",
        ckpt,
        "--data",
        str(data),
        "--samples",
        "2",
        "--out",
        str(out),
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = json.loads(out.read_text())
    assert got["reward_failures"] == {"all": 6, "synthetic_arithmetic": 6}
    assert got["results"]["all"]["avg@2"] == 0.0
    header = next(x for x in proc.stdout.splitlines() if x.startswith("| source"))
    cols = [c.strip() for c in header.strip("|").split("|")]
    row = next(x for x in proc.stdout.splitlines() if x.startswith("| all "))
    cells = dict(zip(cols, (c.strip() for c in row.strip("|").split("|"))))
    assert cells["reward_failures"] == "6" and cells["avg@2"] == "0.0000"
    assert "6 responses could not be scored" in proc.stderr
