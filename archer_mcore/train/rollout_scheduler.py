"""Where each step's rollout groups come from: the loop asks a scheduler.

`rollout.async_steps: 0` (`SyncRollout`): the step generates its batch (and DAPO's
refills), then trains on it; the engine holds the weights of the previous step.

`rollout.async_steps: 1` (`AsyncRollout`): a background thread on rank 0 generates and
scores step k+1's batch while step k trains. Versions (the engine's weight version is
the step whose update it holds; the trainer's policy at step k is version k-1):

- step k+1's first generation batch starts when the trainer takes step k's batch, so it
  samples with version k-1;
- the trainer's weight sync after step k's update waits until that first batch is
  complete, so a sync never lands in the middle of a generation batch;
- DAPO refill batches of step k+1 wait for that sync (or for step k to end without
  one), so they sample with version k.

Every sample carries its `weight_version`; the trainer at step k+1 holds version k, so
no sample is more than one version old (checked for every sample, `check_staleness`).
The waits make the version of every batch a function of the step alone, so an async
run is as deterministic as a synchronous one, and a checkpoint can record the
in-flight state exactly: after step k's sync the first batch of step k+1 is complete;
the checkpoint holds it (plain lists, `groups_to_state`) with the prompt sampler's and
the engine RNG's state right after it, and a resumed run continues step k+1 from there.

Off-policy correction: the loop computes old log-probs with the trainer's current
(pre-update) policy and, with `rollout.tis_cap`, weights each token by
min(pi_old / pi_rollout, cap) (algo/rollout_correction.py); the README explains why.
"""

from __future__ import annotations

import atexit
import contextlib
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

from archer_mcore.config import Config, ConfigError
from archer_mcore.parallel.ranks import broadcast_rollout
from archer_mcore.rollout.types import Sample, SamplingParams
from archer_mcore.train.advantage_batch import ScoredGroup
from archer_mcore.train.collect import collect_step_groups, collect_with, rollout_and_score
from archer_mcore.train.components import Components
from archer_mcore.train.dynamic_sampling import SamplingOutcome
from archer_mcore.train.progress import PhaseTimer
from archer_mcore.train.protocols import RolloutScheduler

Outcome = SamplingOutcome[ScoredGroup]


class StalenessError(RuntimeError):
    """A sample is older than `rollout.async_steps` versions (a scheduling bug)."""


# ----------------------------------------------------------------------------- helpers
def groups_to_state(groups: Sequence[ScoredGroup]) -> list[dict[str, Any]]:
    """Scored groups as plain lists and numbers (loadable with torch.load(weights_only))."""
    return [
        {
            "correct": [float(c) for c in g.correct],
            "scores": None if g.scores is None else [float(x) for x in g.scores],
            "data_source": g.data_source,
            "samples": [
                {
                    "prompt_index": s.prompt_index,
                    "sample_index": s.sample_index,
                    "prompt_ids": [int(t) for t in s.prompt_ids],
                    "token_ids": [int(t) for t in s.token_ids],
                    "logprobs": [float(x) for x in s.logprobs],
                    "finish_reason": s.finish_reason,
                    "weight_version": int(s.weight_version),
                    "request_id": s.request_id,
                }
                for s in g.samples
            ],
        }
        for g in groups
    ]


def groups_from_state(state: Sequence[dict[str, Any]]) -> list[ScoredGroup]:
    """Inverse of `groups_to_state`."""
    return [
        ScoredGroup(
            samples=[Sample(**s) for s in g["samples"]],
            correct=list(g["correct"]),
            data_source=g["data_source"],
            scores=None if g.get("scores") is None else list(g["scores"]),
        )
        for g in state
    ]


def check_staleness(
    groups: Sequence[ScoredGroup], synced: Sequence[int], limit: int | None
) -> dict[str, float]:
    """Staleness of every trained sample: how many policy updates its generating
    weights are behind the trained policy, i.e. how many of the versions `synced` (the
    versions the trainer has synced, ascending; the last is the trained policy's; a step
    without an update syncs nothing) are newer than its weight_version.
    `rollout/staleness_mean` and `_max`. With `limit` set, a sample more than `limit`
    updates old, or newer than the policy, raises StalenessError."""
    policy = synced[-1]
    lags = [sum(v > s.weight_version for v in synced) for g in groups for s in g.samples]
    newer = [s.weight_version for g in groups for s in g.samples if s.weight_version > policy]
    if limit is not None:
        bad = [lag for lag in lags if lag > limit]
        if bad or newer:
            raise StalenessError(
                f"{len(bad) + len(newer)} sample(s) not within {limit} update(s) of the trained "
                f"policy (version {policy}): up to {max(bad, default=0)} update(s) old, "
                f"versions newer than the policy: {sorted(set(newer))}; rollout.async_steps "
                f"allows 0..{limit}"
            )
    if not lags:
        return {"rollout/staleness_mean": 0.0, "rollout/staleness_max": 0.0}
    return {
        "rollout/staleness_mean": sum(lags) / len(lags),
        "rollout/staleness_max": float(max(lags)),
    }


def busy_within(intervals: Sequence[tuple[float, float]], lo: float, hi: float) -> float:
    """Seconds of the (start, end) intervals (perf_counter, non-overlapping) inside [lo, hi]."""
    return sum(max(0.0, min(b, hi) - max(a, lo)) for a, b in intervals)


def overlap_metrics(window_s: float, rollout_busy_s: float, trainer_idle_s: float) -> dict[str, float]:
    """Idle times of both sides over one step's wall time `window_s`, and the share of
    the rollout work that ran while the trainer worked (the trainer idles only while
    the rollout side is busy, so that is busy - trainer idle)."""
    window = max(window_s, 1e-9)
    rollout_idle = max(0.0, window_s - rollout_busy_s)
    hidden = max(0.0, rollout_busy_s - trainer_idle_s)
    return {
        "overlap/trainer_idle_s": trainer_idle_s,
        "overlap/rollout_idle_s": rollout_idle,
        "overlap/trainer_idle_fraction": min(1.0, trainer_idle_s / window),
        "overlap/rollout_idle_fraction": min(1.0, rollout_idle / window),
        "overlap/fraction": hidden / rollout_busy_s if rollout_busy_s > 0 else 0.0,
    }


# ----------------------------------------------------------------------------- sync
class SyncRollout:
    """async_steps 0: generate (with DAPO's refills), then train; the loop's original order."""

    async_steps = 0
    cfg: Config

    def __init__(self, cfg: Config, c: Components, params: SamplingParams, start: int) -> None:
        """start: the step the run starts after (0, or the resumed checkpoint's); the
        engine holds that version when the first step begins."""
        self.cfg, self.c, self.params = cfg, c, params
        self.n = cfg.rollout.n_samples_per_prompt
        self.last_step = cfg.train.steps
        self.synced = [start]  # versions synced so far; the last is the trainer's weights
        self._versions: dict[str, float] = {}
        self._before: tuple[int, dict[str, Any]] | None = None  # (step, state before it)

    def collect(
        self, step: int, timer: PhaseTimer, boundary: Callable[[str], None] | None = None
    ) -> Outcome:
        """Step `step`'s groups (every rank gets them). `boundary(phase)` runs on every
        rank after each generation batch (the loop's stop check; it may raise to drop
        the step). The data position and sampling RNG before the step are kept for
        `state_before`."""
        self._before = (step, SyncRollout.checkpoint_state(self, step - 1))
        outcome = collect_step_groups(self.cfg, self.c, self.params, timer, boundary=boundary)
        self._versions = check_staleness(outcome.groups, self.synced, None)
        return outcome

    def state_before(self, step: int) -> dict[str, Any]:
        """What `checkpoint_state(step - 1)` returned at the end of step `step` - 1: a
        checkpoint of that step written while step `step` runs, before its update
        (the data position and sampling RNG as they were before its rollout)."""
        if self._before is None or self._before[0] != step:
            raise RuntimeError(f"no state recorded before step {step} (collect it first)")
        return self._before[1]

    def initial_sync(self) -> int:
        """Before the first step: the policy's weights into the engine, as the version
        they have (the start step, or the last step that updated before a checkpoint)."""
        return self.c.sync_weights(self.synced[-1])

    def sync_weights(self, step: int) -> int:
        """The policy's weights into the engine as version `step`; bytes sent."""
        sent = self.c.sync_weights(step)
        self.synced.append(step)
        return sent

    def skip_sync(self, step: int) -> None:
        """The policy holds version `step` but the run stops before sending it: record
        the version (a checkpoint carries it); the engine keeps the previous one, and a
        resumed run sends these weights in `initial_sync`."""
        self.synced.append(step)

    @contextlib.contextmanager
    def exclusive(self) -> Iterator[None]:
        """Other engine use (the periodic eval) between generation batches."""
        yield

    def checkpoint_state(self, step: int) -> dict[str, Any]:
        """What a checkpoint after step `step` needs to continue the rollouts exactly."""
        return {"sampler": self.c.prompts.state_dict(), "rollout_rng": self.c.rollout_rng_state()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """After the loop restored the sampler and RNG: refuse what this mode cannot use."""
        if state.get("async_pending"):
            raise ConfigError(
                "the checkpoint was written with rollout.async_steps = 1 and holds the next "
                "step's first generation batch; resume it with rollout.async_steps = 1"
            )

    def step_metrics(self, step: int, timer: PhaseTimer, start: float, end: float) -> dict[str, float]:
        """Staleness and idle/overlap metrics of step `step` (wall clock start..end)."""
        busy = timer.seconds.get("rollout", 0.0) + timer.seconds.get("reward", 0.0)
        return {**self._versions, **overlap_metrics(end - start, busy, busy)}

    def close(self) -> None:
        pass


# ----------------------------------------------------------------------------- async
class AsyncRollout(SyncRollout):
    """async_steps 1: a producer thread (rank 0) collects step k+1 while step k trains.
    See the module docstring for the version rules; every wait below serves them."""

    async_steps = 1

    def __init__(self, cfg: Config, c: Components, params: SamplingParams, start: int) -> None:
        super().__init__(cfg, c, params, start)
        self._cond = threading.Condition()
        self._engine_lock = threading.Lock()  # one generation batch, sync or eval at a time
        self._start = start
        self._requested = start  # the highest step handed to the producer
        self._outcomes: dict[int, Outcome] = {}
        self._first: dict[int, dict[str, Any]] = {}  # step -> state after its first batch
        self._pending: tuple[int, list[ScoredGroup]] | None = None  # restored first batch
        self._finished = start  # the last step the trainer finished
        self._error: BaseException | None = None
        self._closing = False
        self._busy: list[tuple[float, float]] = []  # producer busy intervals (perf_counter)
        self._phases: dict[int, dict[str, float]] = {}  # step -> rollout / reward seconds
        self._trainer_wait = 0.0
        self._thread: threading.Thread | None = None

    # -- trainer side -------------------------------------------------------------------
    def collect(
        self, step: int, timer: PhaseTimer, boundary: Callable[[str], None] | None = None
    ) -> Outcome:
        """Step `step`'s groups from the producer. `boundary` is not called: the
        producer's generation batches run on rank 0's thread alone, so the other ranks
        cannot meet them; the loop's stop check after collect is the boundary here."""
        outcome = broadcast_rollout(self._take(step, timer) if self.c.is_main else None)
        # every rank checks (each keeps the list of synced versions)
        self._versions = check_staleness(outcome.groups, self.synced, self.async_steps)
        return outcome

    def _take(self, step: int, timer: PhaseTimer) -> Outcome:
        """Rank 0: step `step`'s outcome from the producer, which then starts on the next."""
        if self._thread is None:
            self._thread = threading.Thread(target=self._produce, name="async-rollout", daemon=True)
            self._thread.start()
            # also when the loop ends by an exception: the thread must not be generating
            # while the interpreter shuts down (a daemon thread inside torch aborts it)
            atexit.register(self.close)
        with self._cond:
            if self._requested < step:
                self._requested = step
                self._cond.notify_all()
        self._wait(lambda: step in self._outcomes)
        with self._cond:
            outcome = self._outcomes.pop(step)
            if step + 1 <= self.last_step:  # generate the next batch while this one trains
                self._requested = step + 1
                self._cond.notify_all()
            for phase, seconds in self._phases.pop(step, {}).items():
                timer.seconds[phase] = timer.seconds.get(phase, 0.0) + seconds
        return outcome

    def state_before(self, step: int) -> dict[str, Any]:
        """`checkpoint_state(step - 1)`, valid until step `step`'s weight sync: the first
        generation batch of step `step` (recorded by the producer, kept until it starts
        step `step` + 2) with the data position and RNG after it, and the versions
        synced up to step `step` - 1. Resuming from it redoes step `step` from that batch."""
        return self.checkpoint_state(step - 1)

    def skip_sync(self, step: int) -> None:
        with self._cond:
            self.synced.append(step)

    def sync_weights(self, step: int) -> int:
        if self.c.is_main and step + 1 <= self.last_step and self._requested > step:
            self._wait(lambda: step + 1 in self._first)  # between generation batches
        with self._engine_lock:
            sent = self.c.sync_weights(step)
        with self._cond:
            self.synced.append(step)
            self._cond.notify_all()
        return sent

    @contextlib.contextmanager
    def exclusive(self) -> Iterator[None]:
        t0 = time.perf_counter()
        with self._engine_lock:
            self._trainer_wait += time.perf_counter() - t0
            yield

    def checkpoint_state(self, step: int) -> dict[str, Any]:
        if not self.c.is_main or step + 1 > self.last_step or self._requested <= step:
            return super().checkpoint_state(step)
        self._wait(lambda: step + 1 in self._first)
        snap = self._first[step + 1]
        return {
            "sampler": snap["sampler"],
            "rollout_rng": snap["rollout_rng"],
            "async_pending": {"step": step + 1, "groups": snap["groups"]},
            "rollout_synced": self.synced[-2:],  # the versions the staleness counts need
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pending = state.get("async_pending")
        if pending:
            if int(pending["step"]) != self._requested + 1:
                raise ConfigError(
                    f"checkpoint holds the first batch of step {pending['step']} but resumes "
                    f"after step {self._requested}"
                )
            self._pending = (int(pending["step"]), groups_from_state(pending["groups"]))
        if state.get("rollout_synced"):  # the version the checkpointed weights carry
            self.synced = [int(v) for v in state["rollout_synced"]]

    def step_metrics(self, step: int, timer: PhaseTimer, start: float, end: float) -> dict[str, float]:
        with self._cond:
            self._finished = step
            self._cond.notify_all()
            busy = busy_within(self._busy, start, end)
            self._busy = [iv for iv in self._busy if iv[1] > end]
            idle, self._trainer_wait = self._trainer_wait, 0.0
        return {**self._versions, **overlap_metrics(end - start, busy, idle)}

    def close(self) -> None:
        with self._cond:
            self._closing = True
            self._cond.notify_all()
        if self._thread is not None:
            atexit.unregister(self.close)
            self._thread.join(timeout=600)

    def _wait(self, ready: Callable[[], bool]) -> None:
        """Trainer waits (counted as idle) until `ready`; re-raises a producer failure."""
        t0 = time.perf_counter()
        with self._cond:
            self._cond.wait_for(lambda: ready() or self._error is not None)
            self._trainer_wait += time.perf_counter() - t0
            if self._error is not None and not ready():
                raise RuntimeError(f"async rollout failed: {self._error}") from self._error

    # -- producer side (thread) -----------------------------------------------------------
    def _produce(self) -> None:
        done = self._start  # the last step this thread collected
        while True:
            with self._cond:
                self._cond.wait_for(lambda d=done: self._requested > d or self._closing)
                if self._closing:
                    return
                step = done = self._requested
            try:
                outcome = collect_with(self.cfg, self._generator_for(step))
            except BaseException as e:  # handed to the trainer at its next wait
                with self._cond:
                    self._error = e
                    self._cond.notify_all()
                return
            with self._cond:
                self._outcomes[step] = outcome
                self._cond.notify_all()

    def _generator_for(self, step: int) -> Callable[[int], list[ScoredGroup]]:
        """`generate(k)` for dynamic sampling: the first batch as it comes (or restored
        from the checkpoint), recorded; refills only after the trainer's weights of
        step - 1 are in the engine (or step - 1 ended without an update)."""
        calls = 0

        def generate(k: int) -> list[ScoredGroup]:
            nonlocal calls
            calls += 1
            if calls > 1:
                self._producer_wait(
                    lambda: self.synced[-1] >= step - 1 or self._finished >= step - 1
                )
                return self._generate(step, k)
            if self._pending is not None and self._pending[0] == step:
                groups, self._pending = self._pending[1], None
            else:
                groups = self._generate(step, k)
            snap = {
                "groups": groups_to_state(groups),
                "sampler": self.c.prompts.state_dict(),
                "rollout_rng": self.c.rollout_rng_state(),
            }
            with self._cond:
                self._first = {s: v for s, v in self._first.items() if s >= step - 1}
                self._first[step] = snap
                self._cond.notify_all()
            return groups

        return generate

    def _producer_wait(self, ready: Callable[[], bool]) -> None:
        with self._cond:
            self._cond.wait_for(lambda: ready() or self._closing)
            if self._closing:
                raise RuntimeError("async rollout closed while waiting for a weight sync")

    def _generate(self, step: int, k: int) -> list[ScoredGroup]:
        """One generation batch of `k` prompts, scored (rank 0, producer thread)."""
        timer = PhaseTimer()
        with self._engine_lock:
            t0 = time.perf_counter()
            prompts = self.c.prompts.next_batch(k)
            groups = rollout_and_score(self.c, prompts, n=self.n, params=self.params, timer=timer)
            t1 = time.perf_counter()
        with self._cond:
            self._busy.append((t0, t1))
            phases = self._phases.setdefault(step, {})
            for phase, seconds in timer.seconds.items():
                phases[phase] = phases.get(phase, 0.0) + seconds
        return groups


def make_rollout_scheduler(
    cfg: Config, c: Components, params: SamplingParams, start: int
) -> RolloutScheduler:
    """The scheduler `rollout.async_steps` asks for (config validation has refused
    async with a colocated engine)."""
    cls = AsyncRollout if cfg.rollout.async_steps else SyncRollout
    return cls(cfg, c, params, start)
