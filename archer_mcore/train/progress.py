"""Phase timing and the one-line-per-step progress report."""

from __future__ import annotations

import sys
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager

#: The phases of one RL step, in order; `time/<phase>` keys in the step metrics.
PHASES: tuple[str, ...] = ("rollout", "reward", "logprobs", "update", "sync", "eval", "checkpoint")


class PhaseTimer:
    """Wall-clock seconds per phase for the current step: `with timer("rollout"): ...`."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    @contextmanager
    def __call__(self, phase: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[phase] = self.seconds.get(phase, 0.0) + time.perf_counter() - start

    def metrics(self) -> dict[str, float]:
        return {f"time/{k}": v for k, v in self.seconds.items()}


def _fmt(metrics: Mapping[str, float], key: str, spec: str = ".3f") -> str | None:
    return format(metrics[key], spec) if key in metrics else None


def prints_step_line(step: int, total: int, every: int, metrics: Mapping[str, float]) -> bool:
    """`train.log_every`: a step line every `every` steps, at the last step (`total`) and at
    every step that carries an eval result; the other steps are recorded silently."""
    return step % every == 0 or step == total or "eval/accuracy" in metrics


def step_line(step: int, total: int, m: Mapping[str, float]) -> str:
    """One line: reward, accuracy, entropy per group, clip fractions, KL, length,
    throughput and phase times, e.g.
    ``step 3/40 | reward 0.412 acc 0.406 | H all 0.91 kn 0.62 re 2.03 | clip ...``."""
    parts = [f"step {step}/{total}"]
    pieces = [
        ("reward", "reward/mean", ".3f"),
        ("acc", "reward/accuracy", ".3f"),
    ]
    parts.append(" ".join(f"{n} {v}" for n, k, s in pieces if (v := _fmt(m, k, s)) is not None))
    ent = [
        f"{short} {m[f'entropy/{g}']:.3f}"
        for g, short in (
            ("all", "all"),
            ("knowledge", "kn"),
            ("reasoning", "re"),
            ("forking", "fk"),
        )
        if f"entropy/{g}" in m
    ]
    if ent:
        parts.append("H " + " ".join(ent))
    clips = [
        f"{g[:2]} {m[f'clip/low/{g}']:.3f}/{m[f'clip/high/{g}']:.3f}"
        for g in ("all", "knowledge", "reasoning", "forking")
        if f"clip/low/{g}" in m and f"clip/high/{g}" in m
    ]
    if clips:
        parts.append("clip lo/hi " + " ".join(clips))
    if "eval/accuracy" in m:
        parts.append(f"eval acc {m['eval/accuracy']:.3f}")
    if "loss/kl" in m:
        parts.append(f"kl {m['loss/kl']:.2e}")
    if "response/length_mean" in m:
        parts.append(f"len {m['response/length_mean']:.1f}")
    if "throughput/train_tokens_per_s" in m:
        parts.append(f"tok/s {m['throughput/train_tokens_per_s']:.0f}")
    times = [f"{p} {m[f'time/{p}']:.1f}s" for p in PHASES if f"time/{p}" in m]
    if times:
        parts.append(" ".join(times))
    return " | ".join(p for p in parts if p)


class ProgressBar:
    """A minimal progress bar on stderr, shown only when stderr is a terminal."""

    def __init__(self, label: str, total: int, enabled: bool | None = None) -> None:
        self.label, self.total, self.done = label, max(1, total), 0
        self.enabled = sys.stderr.isatty() if enabled is None else enabled

    def update(self, n: int = 1) -> None:
        self.done = min(self.total, self.done + n)
        if self.enabled:
            width = 30
            filled = int(width * self.done / self.total)
            bar = "#" * filled + "." * (width - filled)
            sys.stderr.write(f"\r{self.label} [{bar}] {self.done}/{self.total}")
            sys.stderr.flush()

    def close(self) -> None:
        if self.enabled:
            sys.stderr.write("\r" + " " * (len(self.label) + 50) + "\r")
            sys.stderr.flush()
