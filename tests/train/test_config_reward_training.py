"""A reward added from the config trains with the real trainer (issue 25 item 3).

`rewards.kinds` names tests/rewards/custom_reward_kinds.py:boxed_partial_credit (a graded
reward: 1 for the right boxed answer, 0.25 for a wrong one, 0 for none) for the demo's
data source; nothing in archer_mcore/ knows it. Two CPU steps of `archer train` run
through a driver that records what the scorer scored and what `build_batch` made of it.
The test recomputes every score from the recorded responses with the function itself,
then the rewards (graded mapping + DAPO's overlong penalty) and GRPO advantages in
float64 from the formulas, and compares them with the trainer's; the score metrics are
in metrics.jsonl.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[2]
KINDS_DIR = REPO / "tests" / "rewards"

DRIVER = r"""
import json
import os
import sys

trace = os.environ["REWARD_TRACE"]

from archer_mcore.rewards.scorer import RewardScorer

real_score_batch = RewardScorer.score_batch


def score_batch(self, requests):
    results = real_score_batch(self, requests)
    with open(trace, "a") as f:
        f.write(json.dumps({
            "what": "scored",
            "responses": [r.response for r in requests],
            "ground_truths": [r.ground_truth for r in requests],
            "scores": [x.score for x in results],
            "graded": [x.graded for x in results],
        }) + "\n")
    return results


RewardScorer.score_batch = score_batch

import archer_mcore.train.loop as loop

real_build_batch = loop.build_batch


def build_batch(groups, **kwargs):
    batch = real_build_batch(groups, **kwargs)
    with open(trace, "a") as f:
        f.write(json.dumps({
            "what": "batch",
            "scores": [g.scores for g in groups],
            "lengths": [[len(s.token_ids) for s in g.samples] for g in groups],
            "rewards": batch.rewards.tolist(),
            "advantages": batch.policy.advantages.tolist(),
        }) + "\n")
    return batch


loop.build_batch = build_batch

from archer_mcore.cli import main

sys.exit(main(sys.argv[1:]))
"""

RC, RI = 1.0, -0.5  # reward_correct / reward_incorrect of the run
LMAX, CACHE = 48, 16  # overlong shaping: the demo's max_new_tokens is 48
KIND = (
    "rewards.kinds=[{name: partial_credit, fn: 'custom_reward_kinds:boxed_partial_credit', "
    "sources: [synthetic_arithmetic], graded: true}]"
)


def _reference(scores: list[list[float]], lengths: list[list[int]]) -> tuple[list, list]:
    """(rewards, advantages) [G][n] in float64 from the documented formulas."""
    rewards, advantages = [], []
    for s_row, l_row in zip(scores, lengths):
        row = [
            RI + s * (RC - RI) - min(max(0.0, n - (LMAX - CACHE)) / CACHE, 1.0)
            for s, n in zip(s_row, l_row)
        ]
        mean = sum(row) / len(row)
        std = math.sqrt(sum((x - mean) ** 2 for x in row) / (len(row) - 1))
        rewards.append(row)
        advantages.append([(x - mean) / (std + 1e-6) for x in row])
    return rewards, advantages


def _flat(*nested: list[list[float]]) -> tuple[list[float], ...]:
    return tuple([x for row in rows for x in row] for rows in nested)


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_a_config_reward_trains_and_its_scores_reach_the_advantages(
    archer: Any, helpers: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.syspath_prepend(str(KINDS_DIR))
    import custom_reward_kinds  # the same file the trainer imports (tests/rewards)

    out, trace, driver = tmp_path / "run", tmp_path / "trace.jsonl", tmp_path / "driver.py"
    driver.write_text(DRIVER)
    overrides = [
        *helpers.FAST,
        "algorithm.group_filter=none",  # every group trained: one generation batch a step
        "train.steps=2",
        "checkpoint.save_every=0",
        f"algorithm.reward_correct={RC}",
        f"algorithm.reward_incorrect={RI}",
        "algorithm.overlong_shaping=true",
        f"algorithm.overlong_max_length={LMAX}",
        f"algorithm.overlong_cache_length={CACHE}",
        KIND,
        f"train.output_dir={out}",
    ]
    cmd = archer.command("train", overrides)
    cmd[1] = str(driver)
    env = helpers.child_env()
    env["REWARD_TRACE"] = str(trace)
    # the trainer and its reward workers import the kind by name
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(KINDS_DIR), env.get("PYTHONPATH")) if p)
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=560)
    assert proc.returncode == 0, proc.stderr[-4000:]

    records = [json.loads(line) for line in trace.read_text().splitlines()]
    scored = [r for r in records if r["what"] == "scored"]
    batches = [r for r in records if r["what"] == "batch"]
    assert len(scored) == len(batches) == 2  # one generation batch and one update a step
    rows = helpers.read_metrics(out)
    assert [int(r["step"]) for r in rows] == [1, 2]

    signal = 0.0
    for rec, batch, row in zip(scored, batches, rows):
        # every score is the custom function's, recomputed here from the response
        expected = [
            custom_reward_kinds.boxed_partial_credit(resp, gt, {})
            for resp, gt in zip(rec["responses"], rec["ground_truths"])
        ]
        assert len(expected) == 64 and all(rec["graded"])
        assert rec["scores"] == expected
        n = len(batch["lengths"][0])
        assert [s for g in batch["scores"] for s in g] == expected  # the groups carry them
        ref_rewards, ref_adv = _flat(*_reference(batch["scores"], batch["lengths"]))
        assert len(ref_rewards) == len(batch["advantages"]) == 64
        for got, want in zip(_flat(batch["rewards"])[0], ref_rewards):
            assert got == pytest.approx(want, abs=1e-6)
        for got, want in zip(batch["advantages"], ref_adv):
            assert got == pytest.approx(want, abs=1e-4)
        signal += sum(abs(a) for a in batch["advantages"])
        # the score metrics of the step, from the same scores
        mean = sum(expected) / len(expected)
        std = math.sqrt(sum((x - mean) ** 2 for x in expected) / len(expected))
        assert row["reward/graded_fraction"] == 1.0
        assert row["reward/score_mean"] == pytest.approx(mean, abs=1e-9)
        assert row["reward/score_std"] == pytest.approx(std, abs=1e-9)
        assert row["reward/mean"] == pytest.approx(sum(ref_rewards) / (8 * n), abs=1e-5)
        assert "train/loss" in row  # the step trained
    assert signal > 0  # the graded scores differed within groups: they drove the update
