"""Batch scoring for the trainer: `RewardScorer.score_batch(requests) -> results`.

Requests are scored concurrently by `num_workers` threads; math-style rewards run in
a `KillablePool` of as many worker processes (hard timeout, memory cap), code runs in
the sandbox. Whatever happens to one reward (it raises, hangs, runs out of memory,
its worker dies, its source is unknown, the sandbox is unavailable) the request
scores 0 with a failure reason, the scorer's counters record it, and the step goes
on. Every call is bounded in time: by the process timeout, the sandbox's wall limits,
and for inline functions by `batch_timeout_s`.

Every result is checked against the reward contract (`types.check_result`: score and
fraction_passed finite in [0, 1], correct a bool); one that breaks it becomes a
BAD_RESULT fault scored 0. Each result carries its kind's `graded` flag: for a graded
kind its `score` is the reward signal (train/advantage_batch.shaped_rewards).

Counters (cumulative, `counters()`): "requests", "correct", and "failure/<reason>" for
every failure reason seen; `faults` sums the infrastructure failures (timeouts,
crashes, errors, OOM, unknown source, sandbox unavailable, bad results).
"""

from __future__ import annotations

import dataclasses
import threading
import time
from collections import Counter
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from typing import Any

from archer_mcore.rewards.process_pool import KillablePool, Outcome
from archer_mcore.rewards.registry import RewardKind, RewardRegistry, default_registry
from archer_mcore.rewards.sandbox import Sandbox, SandboxLimits, SandboxUnavailableError
from archer_mcore.rewards.types import (
    BAD_RESULT,
    CRASHED,
    OUT_OF_MEMORY,
    REWARD_ERROR,
    SANDBOX_UNAVAILABLE,
    TIMEOUT,
    UNKNOWN_SOURCE,
    WRONG_ANSWER,
    RewardRequest,
    RewardResult,
    check_result,
)

_OUTCOME_FAILURE = {
    "timeout": TIMEOUT,
    "out_of_memory": OUT_OF_MEMORY,
    "crashed": CRASHED,
    "error": REWARD_ERROR,
}


def _coerce(value: Any, graded: bool = False) -> RewardResult:
    """A reward function's return value as a RewardResult: a bool is pass/fail; a
    number is pass/fail (correct if > 0) for a pass/fail kind and the score for a
    graded one (`RewardResult.graded_score`)."""
    if isinstance(value, RewardResult):
        return value
    if graded and isinstance(value, (int, float)) and not isinstance(value, bool):
        return RewardResult.graded_score(float(value))
    if isinstance(value, (bool, int, float)):
        ok = float(value) > 0
        return RewardResult.passed() if ok else RewardResult.failed(WRONG_ANSWER)
    raise TypeError(
        f"reward function returned {type(value).__name__}, expected RewardResult/bool/float"
    )


class RewardScorer:
    """Scores batches of `RewardRequest`s; thread-safe; `close()` when done.

    num_workers: concurrent requests (threads) and math worker processes.
    process_timeout_s: time limit of a process-executed reward (math), seconds.
    code_limits: sandbox limits of one program run.
    worker_memory_mb: address-space cap of each reward worker process.
    batch_timeout_s: backstop for a whole batch (None: no backstop beyond the
        per-reward limits, which always apply).
    math_strict_answer_form: the default registry's math answer-form rule (see
        `archer_mcore.rewards.math_reward`); with a `registry` given, that registry's
        math kind decides, and passing False here is an error.
    registry: the kinds and routes (the trainer passes the one it built from its
        config, `config_kinds.registry_from_config`); None: `default_registry`.
    """

    def __init__(
        self,
        registry: RewardRegistry | None = None,
        *,
        num_workers: int = 4,
        process_timeout_s: float = 5.0,
        code_limits: SandboxLimits | None = None,
        allow_unsandboxed_code: bool = False,
        worker_memory_mb: int | None = 2048,
        batch_timeout_s: float | None = None,
        preload: tuple[str, ...] = ("math_verify",),
        math_strict_answer_form: bool = True,
    ) -> None:
        if registry is not None and not math_strict_answer_form:
            raise ValueError(
                "math_strict_answer_form=False applies to the default registry only; "
                "register the math kind with the rule you want instead"
            )
        self.registry = registry or default_registry(math_strict_answer_form)
        self.num_workers = num_workers
        self.process_timeout_s = process_timeout_s
        self.code_limits = code_limits or SandboxLimits()
        self.allow_unsandboxed_code = allow_unsandboxed_code
        self.batch_timeout_s = batch_timeout_s
        self.pool = KillablePool(num_workers, memory_mb=worker_memory_mb, preload=preload)
        self._threads = ThreadPoolExecutor(num_workers, thread_name_prefix="reward")
        self._sandbox: Sandbox | None = None
        self._sandbox_error: str | None = None
        self._lock = threading.Lock()
        self._counters: Counter[str] = Counter()

    @classmethod
    def from_config(cls, cfg: Any, registry: RewardRegistry | None = None) -> RewardScorer:
        """Build from `archer_mcore.config.RewardsConfig` (math_timeout_s, code_timeout_s,
        code_memory_mb, num_workers, allow_unsandboxed_code). `registry`: the run's
        (built once from the config); None builds it from `cfg`
        (`registry_from_config`: math_strict_answer_form and kinds)."""
        if registry is None:
            from archer_mcore.rewards.config_kinds import registry_from_config

            registry = registry_from_config(cfg)
        limits = SandboxLimits(
            wall_s=cfg.code_timeout_s, cpu_s=cfg.code_timeout_s, memory_mb=cfg.code_memory_mb
        )
        return cls(
            registry=registry,
            num_workers=cfg.num_workers,
            process_timeout_s=cfg.math_timeout_s,
            code_limits=limits,
            allow_unsandboxed_code=cfg.allow_unsandboxed_code,
        )

    # ------------------------------------------------------------------ scoring
    def _sandbox_or_none(self) -> Sandbox | None:
        with self._lock:
            if self._sandbox is None and self._sandbox_error is None:
                try:
                    self._sandbox = Sandbox(
                        self.code_limits, allow_unsandboxed=self.allow_unsandboxed_code
                    )
                except SandboxUnavailableError as err:
                    self._sandbox_error = str(err)
            return self._sandbox

    def _run_kind(self, kind: RewardKind, req: RewardRequest) -> RewardResult:
        if kind.execution == "process":
            timeout = kind.timeout_s if kind.timeout_s is not None else self.process_timeout_s
            outcome: Outcome = self.pool.run(
                kind.fn, (req.response, req.ground_truth, req.extra), timeout
            )
            if outcome.status == "ok":
                return _coerce(outcome.value, kind.graded)
            return RewardResult.failed(_OUTCOME_FAILURE[outcome.status], outcome.error[:500])
        if kind.execution == "sandbox":
            sandbox = self._sandbox_or_none()
            if sandbox is None:
                return RewardResult.failed(SANDBOX_UNAVAILABLE, self._sandbox_error or "")
            return _coerce(kind.fn(req.response, req.ground_truth, req.extra, sandbox), kind.graded)
        return _coerce(kind.fn(req.response, req.ground_truth, req.extra), kind.graded)

    def _score_one(self, req: RewardRequest) -> RewardResult:
        start = time.monotonic()
        kind = self.registry.kind_for(req.data_source, req.kind)
        if kind is None:
            result = RewardResult.failed(
                UNKNOWN_SOURCE, f"no reward for data_source={req.data_source!r} kind={req.kind!r}"
            )
        else:
            try:
                result = self._run_kind(kind, req)
                broken = check_result(result)
                if broken is not None:
                    result = RewardResult.failed(BAD_RESULT, f"reward kind {kind.name!r}: {broken}")
            except MemoryError:
                result = RewardResult.failed(OUT_OF_MEMORY, "MemoryError in the scorer thread")
            except Exception as err:  # a reward never kills the step
                result = RewardResult.failed(REWARD_ERROR, f"{type(err).__name__}: {err}"[:500])
            result = dataclasses.replace(
                result,
                score=float(result.score),
                fraction_passed=float(result.fraction_passed),
                graded=kind.graded,
            )
        return dataclasses.replace(result, elapsed_s=time.monotonic() - start)

    def score_batch(self, requests: Sequence[RewardRequest]) -> list[RewardResult]:
        """Score every request; results in request order; never raises for a bad reward."""
        futures = [self._threads.submit(self._score_one, r) for r in requests]
        deadline = None if self.batch_timeout_s is None else time.monotonic() + self.batch_timeout_s
        results: list[RewardResult] = []
        for fut in futures:
            try:
                remaining = None if deadline is None else max(0.0, deadline - time.monotonic())
                results.append(fut.result(timeout=remaining))
            except FutureTimeout:
                fut.cancel()
                results.append(RewardResult.failed(TIMEOUT, "batch deadline exceeded"))
        self._count(results)
        return results

    # ------------------------------------------------------------------ metrics
    def _count(self, results: Sequence[RewardResult]) -> None:
        with self._lock:
            self._counters["requests"] += len(results)
            for r in results:
                if r.correct:
                    self._counters["correct"] += 1
                else:
                    self._counters[f"failure/{r.failure}"] += 1
                if r.is_fault:
                    self._counters["faults"] += 1

    def counters(self) -> dict[str, int]:
        """Cumulative counts since construction (see the module docstring)."""
        with self._lock:
            return dict(self._counters)

    def close(self) -> None:
        self._threads.shutdown(wait=False, cancel_futures=True)
        self.pool.close()

    def __enter__(self) -> RewardScorer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def batch_metrics(results: Sequence[RewardResult]) -> dict[str, float]:
    """Per-batch metrics: accuracy, mean fraction passed, fault rate, failure counts."""
    n = max(1, len(results))
    metrics: dict[str, float] = {
        "reward/accuracy": sum(r.correct for r in results) / n,
        "reward/fraction_passed": sum(r.fraction_passed for r in results) / n,
        "reward/fault_rate": sum(r.is_fault for r in results) / n,
        "reward/mean_elapsed_s": sum(r.elapsed_s for r in results) / n,
    }
    for reason, count in Counter(r.failure for r in results if r.failure).items():
        metrics[f"reward/failures/{reason}"] = float(count)
    return metrics
