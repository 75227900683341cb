"""RewardScorer: routing, batch results, faults scored 0 and counted, bounded time."""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import reward_test_helpers as h

from archer_mcore.rewards import sandbox as sandbox_module
from archer_mcore.rewards.registry import RewardRegistry, default_registry
from archer_mcore.rewards.scorer import RewardScorer, batch_metrics
from archer_mcore.rewards.types import (
    ANSWER_FORM,
    CRASHED,
    NO_ANSWER,
    OUT_OF_MEMORY,
    REWARD_ERROR,
    SANDBOX_UNAVAILABLE,
    TIMEOUT,
    UNKNOWN_SOURCE,
    WRONG_ANSWER,
    RewardRequest,
)

pytestmark = [pytest.mark.timeout(180), pytest.mark.usefixtures("worker_pythonpath")]


def test_default_routing() -> None:
    reg = default_registry()
    assert reg.kind_for("synthetic_arithmetic").name == "math"
    assert reg.kind_for("openai/gsm8k").name == "math"
    assert reg.kind_for("DigitalLearningGmbH/MATH-lighteval").name == "math"
    assert reg.kind_for("aime_2024").name == "math"
    assert reg.kind_for("codecontests").name == "code"
    assert reg.kind_for("likaixin/TACO-verified").name == "code"
    assert reg.kind_for("livecodebench/v5").name == "code"
    assert reg.kind_for("something_else") is None
    assert reg.kind_for("something_else", explicit_kind="code").name == "code"
    with pytest.raises(KeyError, match="unknown reward kind 'nope'"):
        reg.map_source("x", "nope")


def _hostile_registry() -> RewardRegistry:
    reg = default_registry()
    for name, fn in [
        ("exact", h.exact_match_reward),
        ("hang", h.hanging_reward),
        ("raise", h.raising_reward),
        ("oom", h.oom_reward),
        ("crash", h.crashing_reward),
    ]:
        # a short limit for the hang; the others get the scorer's default
        reg.register_kind(name, fn, "process", timeout_s=1.0 if name == "hang" else None)
        reg.map_source(f"src_{name}", name)
    return reg


@pytest.mark.slow  # ~5-10 s: worker start-up, a 1 s hang, an OOM and a crash recovery
def test_batch_scores_math_and_contains_every_kind_of_fault() -> None:
    reqs = [
        RewardRequest("4 * 2 = 8. 3 + 8 = 11. 11 - 5 = 6. \\boxed{6}", "6", "synthetic_arithmetic"),
        RewardRequest("\\boxed{7}", "6", "synthetic_arithmetic"),
        RewardRequest("The answer is $\\frac{1}{2}$.", "0.5", "openai/gsm8k"),
        RewardRequest("nothing", "6", "gsm8k"),
        RewardRequest("yes", "yes", "src_exact"),
        RewardRequest("x", "x", "src_hang"),
        RewardRequest("x", "x", "src_raise"),
        RewardRequest("x", "x", "src_oom"),
        RewardRequest("x", "x", "src_crash"),
        RewardRequest("x", "x", "no_such_source"),
    ]
    with RewardScorer(
        _hostile_registry(), num_workers=2, process_timeout_s=30.0, worker_memory_mb=768
    ) as scorer:
        # the first call pays for the workers' start (interpreter + math_verify import)
        start = time.monotonic()
        results = scorer.score_batch(reqs)
        elapsed = time.monotonic() - start
        expected = [
            (True, None),
            (False, WRONG_ANSWER),
            (True, None),
            (False, NO_ANSWER),
            (True, None),
            (False, TIMEOUT),
            (False, REWARD_ERROR),
            (False, OUT_OF_MEMORY),
            (False, CRASHED),
            (False, UNKNOWN_SOURCE),
        ]
        assert [(r.correct, r.failure) for r in results] == expected, [r.detail for r in results]
        assert [r.score for r in results] == [1.0 if ok else 0.0 for ok, _ in expected]
        assert "RuntimeError: reward bug" in results[6].detail
        assert elapsed < 60
        counters = scorer.counters()
        assert counters["requests"] == 10 and counters["correct"] == 3
        # faults: timeout, error, OOM, crash, unknown source (wrong/no answer are not faults)
        assert counters["faults"] == 5
        assert counters["failure/timeout"] == 1 and counters["failure/crashed"] == 1
        # the pool recovered: a second batch works and the counters accumulate
        again = scorer.score_batch([RewardRequest("\\boxed{6}", "6", "synthetic_arithmetic")])
        assert again[0].correct and scorer.counters()["requests"] == 11
    metrics = batch_metrics(results)
    assert metrics["reward/accuracy"] == pytest.approx(3 / 10)
    assert metrics["reward/fault_rate"] == pytest.approx(5 / 10)
    assert metrics["reward/failures/timeout"] == 1.0


@pytest.mark.slow  # ~8-11 s: two worker start-ups and a 5 s math-verify hang
def test_score_batch_from_a_worker_thread_with_timeouts() -> None:
    """math-verify's signal timeouts would fail off the main thread; ours do not. The
    second request is a real math-verify hang: sympy evaluating 9^(9^(9^9)) exactly
    (against a symbolic reference, which the answer-form rule leaves to math-verify)."""
    reqs = [
        RewardRequest("x", "x", "src_hang"),
        RewardRequest("\\boxed{9^{9^{9^{9}}}}", "2\\sqrt{2}", "math"),
        RewardRequest("\\boxed{x^2+1}", "1+x^2", "math"),
    ]
    with RewardScorer(_hostile_registry(), num_workers=2, process_timeout_s=5.0) as scorer:
        # warm both workers (start-up is not charged to a call's timeout, sympy's first
        # symbolic comparison is)
        scorer.score_batch([RewardRequest("\\boxed{y+1}", "1+y", "math")] * 2)
        with ThreadPoolExecutor(1) as ex:
            fut = ex.submit(
                lambda: (
                    threading.current_thread() is threading.main_thread(),
                    scorer.score_batch(reqs),
                )
            )
            on_main, results = fut.result(timeout=120)
    assert not on_main
    assert results[0].failure == TIMEOUT and 0.9 < results[0].elapsed_s < 10
    assert results[1].failure == TIMEOUT and 4.9 < results[1].elapsed_s < 15
    assert results[2].correct


def test_inline_reward_that_hangs_is_cut_by_the_batch_deadline() -> None:
    reg = RewardRegistry()
    release = threading.Event()
    reg.register_kind("slow", lambda r, g, e: release.wait(30), "inline")
    reg.map_source("slow", "slow")
    with RewardScorer(reg, num_workers=1, batch_timeout_s=0.5, preload=()) as scorer:
        start = time.monotonic()
        results = scorer.score_batch([RewardRequest("a", "a", "slow")])
        assert time.monotonic() - start < 5
        assert results[0].failure == TIMEOUT
        release.set()


def test_code_is_refused_without_network_isolation(monkeypatch: pytest.MonkeyPatch) -> None:
    no_net = sandbox_module.Isolation(net=False, mount=False, pid=False, detail="probe says no")
    monkeypatch.setattr(sandbox_module, "probe_isolation", lambda: no_net)
    with pytest.raises(sandbox_module.SandboxUnavailableError, match="allow_unsandboxed_code"):
        sandbox_module.Sandbox()
    with RewardScorer(num_workers=1, preload=()) as scorer:
        [r] = scorer.score_batch(
            [RewardRequest("```python\nprint(1)\n```", {"inputs": [""], "outputs": ["1"]}, "apps")]
        )
    assert r.failure == SANDBOX_UNAVAILABLE and r.score == 0.0
    assert scorer.counters()["faults"] == 1


@pytest.mark.skipif(not sandbox_module.probe_isolation().net, reason="no network namespace")
def test_code_requests_run_in_parallel_through_the_scorer() -> None:
    prog = "```python\nimport time\ntime.sleep(1)\nprint(int(input()) * 2)\n```"
    gt = {"inputs": ["21\n"], "outputs": ["42\n"]}
    with RewardScorer(num_workers=4, preload=()) as scorer:
        start = time.monotonic()
        results = scorer.score_batch([RewardRequest(prog, gt, "codecontests")] * 4)
        elapsed = time.monotonic() - start
    assert all(r.correct and r.fraction_passed == 1.0 for r in results)
    assert elapsed < 3.5, elapsed  # four 1 s sleeps, four at a time (serial: > 4 s)


def test_from_config_uses_the_rewards_section() -> None:
    from archer_mcore.config import RewardsConfig

    cfg = RewardsConfig(math_timeout_s=7.0, code_timeout_s=4.0, code_memory_mb=300, num_workers=3)
    with RewardScorer.from_config(cfg) as scorer:
        assert (scorer.process_timeout_s, scorer.num_workers, scorer.pool.num_workers) == (
            7.0,
            3,
            3,
        )
        assert (
            scorer.code_limits.wall_s,
            scorer.code_limits.cpu_s,
            scorer.code_limits.memory_mb,
        ) == (4.0, 4.0, 300)
        assert scorer.allow_unsandboxed_code is False


def test_math_strict_answer_form_key_reaches_the_math_workers() -> None:
    """rewards.math_strict_answer_form (default true): `\\boxed{0 - 9 - 0}` for -9 is an
    answer-form failure; set to false it is equal to -9 and scores correct."""
    from archer_mcore.config import RewardsConfig, config_from_dict

    assert RewardsConfig().math_strict_answer_form is True
    relaxed = config_from_dict({"rewards": {"math_strict_answer_form": False}}).rewards
    assert relaxed.math_strict_answer_form is False
    restated = RewardRequest("0 - 9 - 0 = -9, so \\boxed{0 - 9 - 0}", "-9", "synthetic_arithmetic")
    honest = RewardRequest("\\boxed{-9}", "-9", "synthetic_arithmetic")
    with RewardScorer.from_config(RewardsConfig(num_workers=1)) as scorer:
        r_restated, r_honest = scorer.score_batch([restated, honest])
        assert (r_restated.correct, r_restated.failure) == (False, ANSWER_FORM)
        assert r_honest.correct
        assert scorer.counters()["failure/answer_form"] == 1
    with RewardScorer.from_config(RewardsConfig(num_workers=1, math_strict_answer_form=False)) as s:
        assert [r.correct for r in s.score_batch([restated, honest])] == [True, True]
    with pytest.raises(ValueError, match="default registry"):
        RewardScorer(default_registry(), math_strict_answer_form=False)
