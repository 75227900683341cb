"""`archer eval CONFIG --checkpoint DIR --data FILE`: avg@k / pass@k per data source,
as JSON and a table, from a checkpoint of a short run."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest


def _eval_file(cache: Path) -> Path:
    """The held-out file the reference run evaluated on (its synthetic-data cache)."""
    files = sorted(cache.glob("synthetic-*-512-*/eval.jsonl"))
    assert len(files) == 1, files
    return files[0]


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_eval_cli_reproduces_the_runs_own_eval(archer, helpers, reference_run, tmp_path):
    # The loop evaluated the final policy of the reference run on its held-out file with
    # seed train.seed + 7 (held_out.evaluate_held_out). `archer eval` rebuilds the policy from
    # the step-5 checkpoint, syncs it into a fresh engine and samples the same prompts with
    # the same seed: if the checkpoint restores the weights exactly, every sample and so
    # every number must be equal.
    from archer_mcore.config import load_config

    seed = load_config(helpers.DEMO_CONFIG, list(helpers.REFERENCE)).train.seed
    out = tmp_path / "eval.json"
    proc = archer.run(
        "eval",
        [*helpers.REFERENCE, f"train.seed={seed + 7}"],
        "--checkpoint",
        str(reference_run / "checkpoints"),
        "--data",
        str(_eval_file(archer.cache)),
        "--out",
        str(out),
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    got = json.loads(out.read_text())
    n = helpers.REFERENCE_STEPS
    assert got["checkpoint"] == str(reference_run / "checkpoints" / f"step_{n:08d}")
    expected = json.loads((reference_run / "eval" / f"step_{n:06d}.json").read_text())
    assert got["results"] == expected
    assert expected["all"]["prompts"] == 16.0 and expected["all"]["samples_per_prompt"] == 4.0


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_eval_cli_reports_each_data_source(archer, helpers, reference_run, tmp_path):
    # Two sources: 6 held-out problems as "arith_a", and 4 as "arith_b" whose ground
    # truth is 100000, which no response can match (operands <= 9, at most 3 of them:
    # |value| <= 729), so arith_b's avg@3 and pass@3 are exactly 0.
    rows = [json.loads(x) for x in _eval_file(archer.cache).read_text().splitlines()][:10]
    for i, r in enumerate(rows):
        r["data_source"] = "arith_a" if i < 6 else "arith_b"
        if i >= 6:
            r["reward_model"]["ground_truth"] = "100000"
    data = tmp_path / "two_sources.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "eval.json"
    proc = archer.run(
        "eval",
        list(helpers.REFERENCE),
        "--checkpoint",
        str(reference_run / "checkpoints"),
        "--data",
        str(data),
        "--samples",
        "3",
        "--out",
        str(out),
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    res = json.loads(out.read_text())["results"]
    assert set(res) == {"arith_a", "arith_b", "all"}
    a, b, both = res["arith_a"], res["arith_b"], res["all"]
    assert (a["prompts"], b["prompts"], both["prompts"]) == (6, 4, 10)
    assert a["samples_per_prompt"] == b["samples_per_prompt"] == 3
    assert b["avg@3"] == 0.0 and b["pass@3"] == 0.0
    for r in (a, both):
        assert 0.0 <= r["avg@3"] <= r["pass@3"] <= 1.0
    # "all" pools the prompts: avg@3 is the prompt-weighted mean of the sources' avg@3.
    assert both["avg@3"] == pytest.approx((6 * a["avg@3"] + 4 * b["avg@3"]) / 10)
    assert both["pass@3"] == pytest.approx((6 * a["pass@3"] + 4 * b["pass@3"]) / 10)
    # The table on stdout: one row per source with the JSON's numbers.
    for name, r in res.items():
        line = next(
            (x for x in proc.stdout.splitlines() if re.match(rf"\|\s*{name}\s*\|", x)), None
        )
        assert line is not None, proc.stdout
        assert f"{r['avg@3']:.4f}" in line and f"{r['pass@3']:.4f}" in line, line
