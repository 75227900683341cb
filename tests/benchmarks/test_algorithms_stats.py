"""The algorithm benchmark's statistics, variants and reproducibility check (fast), against
hand-derived values."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from archer_mcore.config import load_config
from archer_mcore.train.eval_metrics import summarize

ROOT = Path(__file__).resolve().parents[2]
DEMO = ROOT / "configs" / "demo_cpu.yaml"


def test_t_interval_matches_the_t_table(algorithms_bench):
    # [1..5]: mean 3, s^2 = (4+1+0+1+4)/4 = 2.5; t_{0.975,4} = 2.776 (printed t table),
    # half-width = 2.776 * sqrt(2.5) / sqrt(5) = 2.776 * sqrt(0.5) = 1.963.
    m, half, n = algorithms_bench.t_interval([1.0, 2.0, 3.0, 4.0, 5.0])
    assert (m, n) == (3.0, 5)
    assert half == pytest.approx(2.776 * math.sqrt(0.5), abs=1e-3)
    # two values 0, 1: s = sqrt(0.5), t_{0.975,1} = 12.706 -> half = 12.706 * 0.5 = 6.353
    m, half, n = algorithms_bench.t_interval([0.0, 1.0])
    assert m == 0.5 and half == pytest.approx(6.353, abs=1e-3)
    # a 90% interval is narrower: t_{0.95,4} = 2.132
    assert algorithms_bench.t_interval([1.0, 2.0, 3.0, 4.0, 5.0], 0.90)[1] == pytest.approx(
        2.132 * math.sqrt(0.5), abs=1e-3
    )
    # one value: no spread to estimate; NaN values are ignored
    m, half, n = algorithms_bench.t_interval([0.25, math.nan])
    assert m == 0.25 and math.isnan(half) and n == 1


def test_paired_interval_uses_the_seeds_both_have(algorithms_bench):
    a = {1: 0.5, 2: 0.7, 3: 0.9, 4: 0.4}
    b = {1: 0.4, 2: 0.5, 3: 0.6}  # seed 4 missing: dropped
    m, half, n = algorithms_bench.paired_interval(a, b)
    # differences 0.1, 0.2, 0.3: mean 0.2, s = 0.1, t_{0.975,2} = 4.303 -> 4.303 * 0.1 / sqrt(3)
    assert n == 3 and m == pytest.approx(0.2)
    assert half == pytest.approx(4.303 * 0.1 / math.sqrt(3), abs=1e-3)


def test_pass_at_k_for_1_4_16_from_16_samples():
    # problem A: 4 of 16 correct; B: 1 of 16; C: none.
    #   pass@1 = c/n: 0.25, 0.0625, 0
    #   pass@4 = 1 - C(n-c,4)/C(16,4), C(16,4) = 1820: A 1 - C(12,4)/1820 = 1 - 495/1820;
    #            B 1 - C(15,4)/1820 = 1 - 1365/1820 = 0.25; C 0
    #   pass@16: 1, 1, 0
    recs = [("s", [True] * 4 + [False] * 12), ("s", [True] + [False] * 15), ("s", [False] * 16)]
    row = summarize(recs, extra_ks=(1, 4, 16, 32))["all"]
    assert row["avg@16"] == pytest.approx((0.25 + 0.0625) / 3)
    assert row["pass@1"] == pytest.approx(row["avg@16"])
    assert row["pass@4"] == pytest.approx((1 - 495 / 1820 + 0.25) / 3)
    assert row["pass@16"] == pytest.approx(2 / 3)
    assert "pass@32" not in row  # k > n is not estimable from 16 samples


def test_variants_are_one_factor_overrides(algorithms_bench):
    sections = algorithms_bench.build_sections(("train.ppo_epochs=4", "optimizer.lr=3e-4"))
    assert [v.name for v in sections["algorithms"]] == ["grpo", "dapo", "archer", "forking"]
    cfg = {v.name: load_config(DEMO, list(v.overrides)) for vs in sections.values() for v in vs}
    arch = cfg["archer"].algorithm
    assert (arch.agg_mode, arch.kl_coef, arch.clip_low, arch.token_rule.reasoning_clip_low) == (
        "seq-mean-token-mean",
        0.001,
        0.2,
        0.5,
    )

    def flat(name: str) -> dict[str, object]:
        a = dict(vars(cfg[name].algorithm))
        rule = vars(a.pop("token_rule"))
        return {**a, **{f"token_rule.{k}": v for k, v in rule.items()}}

    def changed(name: str, ref: str) -> dict[str, tuple]:
        a, b = flat(name), flat(ref)
        return {k: (a[k], b[k]) for k in a if a[k] != b[k]}

    # each ablation moves exactly its factor, nothing else
    assert changed("archer-tokmean", "archer") == {
        "agg_mode": ("token-mean", "seq-mean-token-mean")
    }
    assert changed("archer-kl0", "archer") == {"kl_coef": (0.0, 0.001)}
    assert changed("archer-kclip", "archer") == {"clip_low": (0.5, 0.2), "clip_high": (0.5, 0.2)}
    assert changed("archer-rclip", "archer") == {
        "token_rule.reasoning_clip_low": (0.2, 0.5),
        "token_rule.reasoning_clip_high": (0.2, 0.5),
    }
    assert changed("archer-nofilter", "archer") == {"group_filter": ("none", "drop")}
    assert changed("grpo-seqmean", "grpo") == {"agg_mode": ("seq-mean-token-mean", "token-mean")}
    refs = {v.name: v.reference for v in sections["ablations"]}
    assert refs["archer-kl0"] == "archer" and refs["grpo-seqmean"] == "grpo"
    # the regime: the algorithm's preset plus the regime overrides
    for a in ("grpo", "dapo", "forking", "archer"):
        hot = cfg[f"{a}-hot"]
        assert (hot.train.ppo_epochs, hot.optimizer.lr) == (4, 3e-4)
        assert hot.algorithm == cfg[a].algorithm


def _write_run(path: Path, rows: list[dict], evals: dict[int, dict]) -> None:
    (path / "eval").mkdir(parents=True)
    (path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    for step, row in evals.items():
        (path / "eval" / f"step_{step:06d}.json").write_text(json.dumps({"all": row}))


def test_reproducibility_diff_ignores_only_wall_clock(algorithms_bench, tmp_path: Path):
    row = {"step": 1.0, "loss/pg": 0.5, "time/step": 2.0, "throughput/train_tokens": 100.0}
    _write_run(tmp_path / "a", [row], {0: {"avg@4": 0.5}})
    _write_run(
        tmp_path / "b",
        [{**row, "time/step": 3.0, "throughput/train_tokens_per_s": 9.0}],
        {0: {"avg@4": 0.5}},
    )
    assert algorithms_bench.reproducibility_diff(tmp_path / "a", tmp_path / "b") == []
    _write_run(
        tmp_path / "c",
        [{**row, "loss/pg": 0.5000001, "throughput/train_tokens": 101.0}],
        {0: {"avg@4": 0.25}},
    )
    diff = algorithms_bench.reproducibility_diff(tmp_path / "a", tmp_path / "c")
    assert any("loss/pg" in d for d in diff)
    assert any("throughput/train_tokens " in d for d in diff)  # a count, not a timing
    assert "eval/step_000000.json differs" in diff


def test_summary_tables_from_runs_on_disk(algorithms_bench, tmp_path: Path):
    """Two variants x 2 seeds written by hand: the table's cells and the paired
    difference are the hand-computed ones."""
    b = algorithms_bench
    sections = b.build_sections(b.REGIME)
    by = {v.name: v for vs in sections.values() for v in vs}
    runs = []
    values = {
        ("grpo", 1): 0.5,
        ("grpo", 2): 0.7,
        ("grpo-seqmean", 1): 0.4,
        ("grpo-seqmean", 2): 0.5,
    }
    for (name, seed), acc in values.items():
        d = tmp_path / f"{name}_s{seed}"
        rows = [
            {"step": float(s), "entropy/all": 0.1 * s, "clip/low/all": 0.01, "clip/high/all": 0.02}
            for s in range(1, 7)
        ]
        _write_run(
            d,
            rows,
            {
                0: {"avg@16": 0.3, "pass@4": 0.6, "pass@16": 0.8},
                6: {"avg@16": acc, "pass@1": acc, "pass@4": acc + 0.1, "pass@16": acc + 0.2},
            },
        )
        runs.append(b.RunResult(name, seed, str(d), 0, 10.0, b.read_metrics(d / "metrics.jsonl")))
    cfg = load_config(DEMO, ["eval.n_samples=16"])
    rows = b.summarise(runs, [by["grpo"], by["grpo-seqmean"]], lambda v: cfg)
    grpo, seq = rows
    assert grpo["interval"]["avg@16"][0] == pytest.approx(0.6)
    # entropy of the first 3 updates (0.1, 0.2, 0.3) and the last 5 (0.2..0.6)
    assert grpo["interval"]["entropy_start/all"][0] == pytest.approx(0.2)
    assert grpo["interval"]["entropy_end/all"][0] == pytest.approx(0.4)
    assert grpo["interval"]["clip_end/all"][0] == pytest.approx(0.03)
    # paired: seqmean - grpo = -0.1, -0.2 -> mean -0.15, s = sqrt(0.005), t_{0.975,1} = 12.706
    m, half, n = seq["vs_reference"]["avg@16"]
    assert (n, m) == (2, pytest.approx(-0.15))
    assert half == pytest.approx(12.706 * math.sqrt(0.005) / math.sqrt(2), abs=1e-3)
    table = b.markdown_table(rows, 16)
    assert "| `grpo` | 2 | 0.600 ± " in table and "pass@16" in table
    diffs = b.difference_table(rows, 16)
    assert "`grpo-seqmean` − `grpo` | 2 | -0.150 ± " in diffs
    # a reference from another section: measured for the difference, no row of its own
    (only,) = b.summarise(runs, [by["grpo-seqmean"]], lambda v: cfg, references=[by["grpo"]])
    assert only["variant"] == "grpo-seqmean"
    assert only["vs_reference"]["avg@16"][0] == pytest.approx(-0.15)
