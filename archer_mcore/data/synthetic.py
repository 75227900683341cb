"""A synthetic verifiable task: multi-step integer arithmetic with a \\boxed{} answer.

    rows = generate_arithmetic_rows(1000, ArithmeticTaskConfig(max_operands=4), seed=0)
    write_jsonl(rows, "train.jsonl")

A problem is "Compute 3 + 4 * 2 - 5." (usual precedence: * before + and -, left to
right), ground truth "6". Each row also carries a worked solution in
`extra_info["solution"]`, the target of supervised warm-start:
"4 * 2 = 8. 3 + 8 = 11. 11 - 5 = 6. \\boxed{6}". Generation is deterministic in
(config, seed, index).
"""

from __future__ import annotations

import json
import random
from collections.abc import Collection, Iterable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

DATA_SOURCE = "synthetic_arithmetic"
PROMPT_PREFIX = "Compute "


@dataclass(frozen=True, kw_only=True)
class ArithmeticTaskConfig:
    """Difficulty knobs: operand count range, operand value range, operators used."""

    min_operands: int = 2
    max_operands: int = 4
    min_value: int = 0
    max_value: int = 9
    operators: str = "+-*"

    def __post_init__(self) -> None:
        if not 2 <= self.min_operands <= self.max_operands:
            raise ValueError(
                f"need 2 <= min_operands <= max_operands, got {self.min_operands}, {self.max_operands}"
            )
        if not 0 <= self.min_value <= self.max_value:
            raise ValueError(
                f"need 0 <= min_value <= max_value, got {self.min_value}, {self.max_value}"
            )
        if not self.operators or set(self.operators) - set("+-*"):
            raise ValueError(
                f"operators must be a non-empty subset of '+-*', got {self.operators!r}"
            )


Token = int | str  # an operand or an operator


def _apply(a: int, op: str, b: int) -> int:
    return a + b if op == "+" else a - b if op == "-" else a * b


def solve_steps(tokens: list[Token]) -> tuple[int, list[str]]:
    """Evaluate [n0, op1, n1, ...] with * before +/-, left to right; the steps as text.

    Each step reduces the leftmost highest-precedence operator:
    [3, +, 4, *, 2, -, 5] -> "4 * 2 = 8", "3 + 8 = 11", "11 - 5 = 6"; returns (6, steps).
    """
    toks = list(tokens)
    steps: list[str] = []
    for ops in ("*", "+-"):
        i = 1
        while i < len(toks):
            op = toks[i]
            if isinstance(op, str) and op in ops:
                a, b = toks[i - 1], toks[i + 1]
                assert isinstance(a, int) and isinstance(b, int)
                value = _apply(a, op, b)
                steps.append(f"{a} {op} {b} = {value}")
                toks[i - 1 : i + 2] = [value]
            else:
                i += 2
    (result,) = toks
    assert isinstance(result, int)
    return result, steps


def format_expression(tokens: list[Token]) -> str:
    return " ".join(str(t) for t in tokens)


def solution_text(tokens: list[Token]) -> str:
    """The worked solution: "4 * 2 = 8. 3 + 8 = 11. 11 - 5 = 6. \\boxed{6}"."""
    value, steps = solve_steps(tokens)
    return "".join(f"{s}. " for s in steps) + f"\\boxed{{{value}}}"


def sample_expression(rng: random.Random, cfg: ArithmeticTaskConfig) -> list[Token]:
    n = rng.randint(cfg.min_operands, cfg.max_operands)
    tokens: list[Token] = [rng.randint(cfg.min_value, cfg.max_value)]
    for _ in range(n - 1):
        tokens += [rng.choice(cfg.operators), rng.randint(cfg.min_value, cfg.max_value)]
    return tokens


def arithmetic_row(tokens: list[Token], index: int, cfg: ArithmeticTaskConfig) -> dict[str, Any]:
    """One row in the verl schema (see `archer_mcore.data.schema`)."""
    expression = format_expression(tokens)
    value, _ = solve_steps(tokens)
    return {
        "data_source": DATA_SOURCE,
        "prompt": [{"role": "user", "content": f"{PROMPT_PREFIX}{expression}."}],
        "ability": "math",
        "reward_model": {"style": "rule", "ground_truth": str(value)},
        "extra_info": {
            "index": index,
            "expression": expression,
            "solution": solution_text(tokens),
            "config": asdict(cfg),
        },
    }


def generate_arithmetic_rows(
    n: int,
    cfg: ArithmeticTaskConfig | None = None,
    seed: int = 0,
    exclude_expressions: Collection[str] = (),
    max_tries: int = 1000,
) -> list[dict[str, Any]]:
    """`n` rows; row i depends only on (cfg, seed, i, exclude_expressions), so prefixes
    agree across n.

    exclude_expressions: expressions (as in `extra_info["expression"]`) not to produce,
    e.g. the training set's when generating an evaluation set; a row redraws (up to
    `max_tries` times, else ValueError: the knobs allow too few distinct problems).
    """
    cfg = cfg or ArithmeticTaskConfig()
    excluded = set(exclude_expressions)
    rows = []
    for i in range(n):
        rng = random.Random(f"archer-arith:{seed}:{i}")
        for _ in range(max_tries):
            tokens = sample_expression(rng, cfg)
            if format_expression(tokens) not in excluded:
                break
        else:
            raise ValueError(
                f"row {i}: no expression outside the excluded set in {max_tries} draws"
            )
        rows.append(arithmetic_row(tokens, i, cfg))
    return rows


def write_jsonl(rows: Iterable[dict[str, Any]], path: str | Path) -> Path:
    """Write one JSON object per line (UTF-8); creates parent directories."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    with open(p, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    return p
