"""Steps that train on nothing (dynamic sampling dropped every group) still run the
step's eval and checkpoint: the final checkpoint of a run must exist however its last
step went."""

from __future__ import annotations

import pytest

from archer_mcore.actor.checkpoint_store import verify_checkpoint


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_steps_without_an_update_still_eval_and_checkpoint(archer, helpers, tmp_path):
    # One-token responses hold no boxed answer: every sample is wrong, every group is
    # all-wrong and the drop filter leaves nothing to train on, at every step.
    out = tmp_path / "run"
    proc = archer.run(
        "train",
        [
            *helpers.FAST,
            "algorithm.group_filter=drop",
            "rollout.max_new_tokens=1",
            "train.steps=2",
            "eval.every=2",
            "checkpoint.save_every=0",
            f"train.output_dir={out}",
        ],
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    rows = helpers.read_metrics(out)
    assert [int(r["step"]) for r in rows] == [1, 2]
    for r in rows:
        assert r["sampling/drop_rate"] == 1.0 and "train/loss" not in r
    assert "eval/accuracy" in rows[1] and (out / "eval" / "step_000002.json").is_file()
    root = out / "checkpoints"
    assert (root / "latest").read_text().strip() == "step_00000002"
    assert verify_checkpoint(root / "step_00000002")["step"] == 2
    # Nothing trained: the policy made no optimizer step at all.
    assert helpers.checkpoint(root / "step_00000002")["common"]["step"] == 0
