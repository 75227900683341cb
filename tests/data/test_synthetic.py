"""The synthetic arithmetic task: values against Python's own evaluation, determinism,
difficulty knobs, and the math reward scoring its solutions."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from archer_mcore.data.schema import parse_row
from archer_mcore.data.synthetic import (
    ArithmeticTaskConfig,
    generate_arithmetic_rows,
    solution_text,
    solve_steps,
    write_jsonl,
)
from archer_mcore.rewards.math_reward import score_math


def test_hand_worked_example() -> None:
    # 3 + 4 * 2 - 5: multiply first (4 * 2 = 8), then left to right: 3 + 8 = 11, 11 - 5 = 6
    value, steps = solve_steps([3, "+", 4, "*", 2, "-", 5])
    assert value == 6
    assert steps == ["4 * 2 = 8", "3 + 8 = 11", "11 - 5 = 6"]
    assert (
        solution_text([3, "+", 4, "*", 2, "-", 5])
        == "4 * 2 = 8. 3 + 8 = 11. 11 - 5 = 6. \\boxed{6}"
    )
    # 2 * 3 * 4 - 1 - 1: products left to right (6, 24), then 23, 22
    assert solve_steps([2, "*", 3, "*", 4, "-", 1, "-", 1]) == (
        22,
        ["2 * 3 = 6", "6 * 4 = 24", "24 - 1 = 23", "23 - 1 = 22"],
    )


def test_answers_match_python_evaluation_and_knobs_hold() -> None:
    cfg = ArithmeticTaskConfig(
        min_operands=3, max_operands=5, min_value=10, max_value=20, operators="+*"
    )
    rows = generate_arithmetic_rows(300, cfg, seed=7)
    counts = set()
    for row in rows:
        expr = row["extra_info"]["expression"]
        assert row["prompt"] == [{"role": "user", "content": f"Compute {expr}."}]
        # Python's precedence for + - * is the task's: eval is an independent reference
        assert row["reward_model"]["ground_truth"] == str(eval(expr))
        numbers = [int(x) for x in re.findall(r"\d+", expr)]
        assert all(10 <= x <= 20 for x in numbers)
        assert set(re.findall(r"[-+*]", expr)) <= {"+", "*"}
        counts.add(len(numbers))
        assert parse_row(row).data_source == "synthetic_arithmetic"
    assert counts == {3, 4, 5}


def test_deterministic_by_seed_and_prefix_stable(tmp_path: Path) -> None:
    a = generate_arithmetic_rows(50, seed=3)
    assert a == generate_arithmetic_rows(50, seed=3)
    assert a[:20] == generate_arithmetic_rows(20, seed=3)
    assert a != generate_arithmetic_rows(50, seed=4)
    path = write_jsonl(a, tmp_path / "sub" / "train.jsonl")
    lines = path.read_text().splitlines()
    assert [json.loads(line) for line in lines] == a


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(min_operands=1),
        dict(min_operands=4, max_operands=3),
        dict(min_value=-1),
        dict(operators="/"),
        dict(operators=""),
    ],
)
def test_bad_config_is_rejected(kwargs: dict) -> None:
    with pytest.raises(ValueError):
        ArithmeticTaskConfig(**kwargs)


def test_math_reward_scores_the_task() -> None:
    rows = generate_arithmetic_rows(40, seed=11)
    for row in rows:
        gt = row["reward_model"]["ground_truth"]
        assert score_math(row["extra_info"]["solution"], gt).correct
        wrong = str(int(gt) + 1)
        assert not score_math(f"... \\boxed{{{wrong}}}", gt).correct


def test_eval_set_excludes_training_expressions() -> None:
    # 2 operands in 0..2 with "+": 3 * 3 = 9 distinct problems
    cfg = ArithmeticTaskConfig(
        min_operands=2, max_operands=2, min_value=0, max_value=2, operators="+"
    )
    train = generate_arithmetic_rows(4, cfg, seed=0)
    seen = {r["extra_info"]["expression"] for r in train}
    assert 1 <= len(seen) < 9
    held_out = generate_arithmetic_rows(10, cfg, seed=1, exclude_expressions=seen)
    assert not seen & {r["extra_info"]["expression"] for r in held_out}
    all_nine = {f"{a} + {b}" for a in range(3) for b in range(3)}
    with pytest.raises(ValueError, match="excluded set"):
        generate_arithmetic_rows(1, cfg, seed=2, exclude_expressions=all_nine, max_tries=50)
