"""Every sandbox and reward limit in the config is bounded at load (issue 22, item 10).

`rewards.code_timeout_s: 1e30` used to pass config load; every code sample then failed
its sandbox setup (RLIMIT_CPU out of range) and was scored a wrong answer, with the
fault counter at 0. Now the loader names the key and its range; the extremes it
accepts make a working sandbox; and a run whose sandbox cannot be set up is a reward
fault (counted, `reward/fault_rate`, `reward/failures/sandbox_setup_failed`).
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import pytest

from archer_mcore.config import ConfigError, load_config
from archer_mcore.config.schema import RewardsConfig
from archer_mcore.rewards.registry import RewardRegistry
from archer_mcore.rewards.sandbox import LIMIT_RANGES, Sandbox, SandboxLimits, probe_isolation
from archer_mcore.rewards.scorer import RewardScorer, batch_metrics
from archer_mcore.rewards.types import SANDBOX_SETUP_FAILED, RewardRequest


def _config_file(tmp_path: Path) -> Path:
    path = tmp_path / "c.yaml"
    path.write_text("rewards:\n  num_workers: 1\n")
    return path


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("code_timeout_s", "1e30"),
        ("code_timeout_s", "601"),
        ("code_timeout_s", "0.001"),
        ("code_timeout_s", "0"),
        ("code_timeout_s", "-1"),
        ("code_memory_mb", "1"),
        ("code_memory_mb", "1000000000"),
        ("math_timeout_s", "1e30"),
        ("math_timeout_s", "0"),
        ("num_workers", "1000000"),
        ("num_workers", "0"),
    ],
)
def test_out_of_range_reward_limits_fail_at_load(tmp_path: Path, key: str, value: str) -> None:
    with pytest.raises(ConfigError) as err:
        load_config(_config_file(tmp_path), [f"rewards.{key}={value}"])
    message = str(err.value)
    assert f"rewards.{key}" in message  # names the key
    assert "range" in message or "must be" in message, message  # and says what is allowed


@pytest.mark.parametrize("value", ["nan", "inf", ".inf"])
def test_non_finite_code_timeout_fails_at_load(tmp_path: Path, value: str) -> None:
    with pytest.raises(ConfigError, match="rewards.code_timeout_s"):
        load_config(_config_file(tmp_path), [f"rewards.code_timeout_s={value}"])


def _bounds(name: str) -> tuple[float, float]:
    meta = {f.name: f.metadata for f in dataclasses.fields(RewardsConfig)}[name]
    low = meta.get("ge", meta.get("gt"))
    return low, meta["le"]


def test_every_limit_the_config_accepts_is_a_valid_sandbox_limit() -> None:
    for key, fields in (
        ("code_timeout_s", ("wall_s", "cpu_s")),
        ("code_memory_mb", ("memory_mb",)),
    ):
        low, high = _bounds(key)
        for field in fields:
            lo, hi = LIMIT_RANGES[field]
            assert lo <= low and high <= hi, (key, field)
    for value in (1e30, float("nan"), 0, -1):
        with pytest.raises(ValueError, match="SandboxLimits.wall_s"):
            SandboxLimits(wall_s=value)
    with pytest.raises(ValueError, match="SandboxLimits.max_open_files"):
        SandboxLimits(max_open_files=1 << 40)


@pytest.mark.skipif(os.geteuid() != 0, reason="namespaces and uid switching need root")
def test_the_smallest_limits_the_config_accepts_run_a_program(tmp_path: Path) -> None:
    if not probe_isolation().net:
        pytest.skip("no network namespace on this machine")
    t_low, m_low = _bounds("code_timeout_s")[0], int(_bounds("code_memory_mb")[0])
    cfg = load_config(
        _config_file(tmp_path),
        [f"rewards.code_timeout_s={t_low}", f"rewards.code_memory_mb={m_low}"],
    )
    limits = SandboxLimits(wall_s=cfg.rewards.code_timeout_s, cpu_s=cfg.rewards.code_timeout_s,
                           memory_mb=cfg.rewards.code_memory_mb)  # fmt: skip
    run = Sandbox(limits, base_uid=310_000).run_python("import json, re, math\nprint(6 * 7)")
    assert (run.exit_code, run.stdout) == (0, b"42\n"), run.describe()


def _broken_code_fn(response: str, ground_truth: object, extra: dict, sandbox: Sandbox) -> object:
    from archer_mcore.rewards.code_reward import score_code

    broken = dataclasses.replace(sandbox.limits)
    object.__setattr__(broken, "max_open_files", 1 << 40)  # past SandboxLimits' checks
    object.__setattr__(sandbox, "limits", broken)
    return score_code(response, ground_truth, sandbox)


@pytest.mark.skipif(os.geteuid() != 0, reason="namespaces and uid switching need root")
def test_a_sandbox_setup_failure_is_counted_as_a_reward_fault() -> None:
    if not probe_isolation().net:
        pytest.skip("no network namespace on this machine")
    registry = RewardRegistry()
    registry.register_kind("code", _broken_code_fn, "sandbox")
    scorer = RewardScorer(registry=registry, num_workers=1, preload=(),
                          code_limits=SandboxLimits(wall_s=5, cpu_s=3))  # fmt: skip
    try:
        req = RewardRequest(
            "```python\nprint(1)\n```", {"inputs": [""], "outputs": ["1"]}, kind="code"
        )
        (result,) = scorer.score_batch([req])
        assert (result.correct, result.failure, result.is_fault) == (
            False,
            SANDBOX_SETUP_FAILED,
            True,
        )
        assert scorer.counters().get("faults") == 1  # the trainer's reward/failures metric
        metrics = batch_metrics([result])
        assert metrics["reward/fault_rate"] == 1.0
        assert metrics[f"reward/failures/{SANDBOX_SETUP_FAILED}"] == 1.0
    finally:
        scorer.close()
