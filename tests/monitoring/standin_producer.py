"""STAND-IN metric producer (until the trainer lands): realistic per-step metric dicts.

The lead replaces this with a short real demo run. Two profiles:

- "healthy": entropy declines slowly (0.6 -> ~0.45 nats), reward rises, steady
  throughput, no failures. Must trigger no alert.
- "degraded": entropy collapses to 0.01, reward declines, throughput drops to 2 %,
  one reward failure and skipped steps, and the loss turns NaN near the end. Must
  trigger every alert except ArcherExporterDown.

Every key of archer_mcore.metrics.keys is emitted (and `step`, as the trainer does), so each dashboard panel
has data.
"""

from __future__ import annotations

import math
import random
import threading
from typing import Literal

from archer_mcore.metrics.exporter import MetricsExporter
from archer_mcore.metrics.keys import PHASES
from archer_mcore.metrics.repetition import mean_ngram_repetition_rate

Profile = Literal["healthy", "degraded"]


def standin_step_metrics(
    step: int, profile: Profile, rng: random.Random, degrade_at: int = 40
) -> dict[str, float]:
    """One step's flat metrics. `degrade_at`: first degraded step of the degraded profile."""
    bad = profile == "degraded" and step >= degrade_at
    if bad:
        entropy = 0.01
        reward = 0.2 - 0.002 * step
    else:
        entropy = 0.6 * math.exp(-0.005 * step) + rng.uniform(-0.01, 0.01)
        if profile == "healthy":  # rises towards 0.9 without ever flattening out
            reward = 0.9 - 1.3 * math.exp(-step / 200) + rng.uniform(-0.005, 0.005)
        else:
            reward = 0.2 - 0.002 * step
    accuracy = min(1.0, max(0.0, (reward + 1) / 2))
    # 2 % of normal when degraded: below half the long-run average until the bad phase
    # is ~48x longer than the good one, so a slow test host cannot outwait the alert
    scale = 0.02 if bad else 1.0
    rollout_tps = (5000.0 + rng.uniform(-50, 50)) * scale
    train_tps = (20000.0 + rng.uniform(-100, 100)) * scale
    # repetition measured on generated token ids: degraded responses loop on a phrase
    responses = (
        [[7, 8, 9] * 10 for _ in range(4)]
        if bad
        else [[rng.randrange(1000) for _ in range(30)] for _ in range(4)]
    )
    m: dict[str, float] = {
        "reward/mean": reward,
        "reward/std": 0.3,
        "reward/accuracy": accuracy,
        "reward/failures": 1.0 if bad and step == degrade_at else 0.0,
        "entropy/knowledge": entropy * 0.4,
        "entropy/reasoning": entropy * 3.4,
        "entropy/all": entropy,
        "forking/share": 0.2,
        "response/length_mean": 400.0 + 5 * step,
        "response/repetition": mean_ngram_repetition_rate(responses, n=4),
        "throughput/rollout_tokens_per_s": rollout_tps,
        "throughput/train_tokens_per_s": train_tps,
        "throughput/rollout_tokens": rollout_tps * 2.0,
        "throughput/train_tokens": train_tps * 0.5,
        "sync/bytes": 2.0 * 1.5e9,  # a 1.5B-parameter model in bf16
        "sampling/drop_rate": 0.3 + rng.uniform(-0.05, 0.05),
        "train/skipped_steps": 1.0 if bad else 0.0,
        "train/loss": math.nan if bad else 0.05 + rng.uniform(-0.01, 0.01),
        "train/grad_norm": 0.8 + rng.uniform(-0.1, 0.1),
        "train/lr": 1e-6,
        "train/update_skipped": 1.0 if bad else 0.0,
        "loss/pg": 0.04,
        "loss/kl": 0.001,
        "loss/entropy": 0.0,
        "share/knowledge": 0.8,
        "share/reasoning": 0.2,
        "share/forking": 0.2,
        "share/all": 1.0,
        "tokens/knowledge": 8000.0,
        "tokens/reasoning": 2000.0,
        "tokens/forking": 2000.0,
        "tokens/all": 10000.0,
        "response/length_max": 900.0 + 5 * step,
        "response/clip_ratio": 0.01,
        "rollout/logprob_abs_diff": 0.002,
        "sampling/generation_batches": 1.0 + (step % 2),
        "rollout/staleness_mean": 0.9,  # rollout.async_steps 1: mostly one update old
        "rollout/staleness_max": 1.0,
        "overlap/trainer_idle_s": 0.4,
        "overlap/rollout_idle_s": 0.2,
        "overlap/trainer_idle_fraction": 0.1,
        "overlap/rollout_idle_fraction": 0.05,
        "overlap/fraction": 0.85,
        "eval/accuracy": accuracy * 0.9,
        "eval/pass@4": min(1.0, accuracy * 1.3),
        # a MoE policy's router load (actor/moe_load.py): two layers, dropless
        "moe/layer/1/load_max_over_mean": 1.4,
        "moe/layer/2/load_max_over_mean": 1.8 if bad else 1.2,
        "moe/load_max_over_mean": 1.8 if bad else 1.4,
        "moe/tokens_dropped_fraction": 0.0,
        "step": float(step),
    }
    for group in ("knowledge", "reasoning", "all"):
        m[f"kl/{group}"] = 0.002 if group != "reasoning" else 0.01
        m[f"clip/low/{group}"] = 0.01
        m[f"clip/high/{group}"] = 0.02 if group == "reasoning" else 0.005
        m[f"clip/dual/{group}"] = 0.001
    times = {
        "rollout": 2.0,
        "reward": 0.3,
        "logprobs": 0.6,
        "update": 1.5,
        "sync": 0.4,
        "eval": 0.8,
        "checkpoint": 0.5,
    }
    for phase in PHASES:
        if phase != "step":
            m[f"time/{phase}"] = times[phase] * rng.uniform(0.9, 1.1) * (5 if bad else 1)
    m["time/step"] = sum(m[f"time/{p}"] for p in PHASES if p != "step")
    return m


class StandinProducer:
    """Feeds an exporter one stand-in step every `period` s on a thread until stopped."""

    def __init__(
        self, exporter: MetricsExporter, profile: Profile, period: float = 0.25, seed: int = 0
    ) -> None:
        self.exporter = exporter
        self.profile = profile
        self.period = period
        self.rng = random.Random(seed)
        self.steps = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name=f"standin-{profile}", daemon=True)

    def start(self) -> StandinProducer:
        self._thread.start()
        return self

    def _loop(self) -> None:
        while not self._stop.is_set():
            self.exporter.record_step(
                self.steps, standin_step_metrics(self.steps, self.profile, self.rng)
            )
            self.steps += 1
            self._stop.wait(self.period)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=10)
