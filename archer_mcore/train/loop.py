"""The RL loop: one step is collect (rollout + reward) -> advantages -> log-probs ->
update -> sync -> finish (eval, checkpoint, report).

`train` resumes, runs the steps and finishes; `rl_step` reads top to bottom as one
step, each phase one named call (collect.py, advantage_batch.py, update.py; metrics
assembled in step_metrics.py). The parts they drive (policy, engine, rewards, data,
metrics) are built in `components.py` and typed by the Protocols in `protocols.py`.

Stopping (SIGUSR1 / SIGTERM / Ctrl-C; train/signals.py). The stop flag is checked, and
agreed by every rank, at each phase boundary: after every generation batch (each DAPO
refill round included; with async rollout, when the step's batch is taken), after
scoring and collect, after the old log-probs, after the update (before the weight
sync), and after the sync (`finish_step`). A step's update is one unit: its
mini-batches form one optimizer trajectory from step k - 1's weights, and a state in
the middle of it is none an uninterrupted run passes through at a step boundary (a
resume would need the pre-update log-probs, which the updated policy can no longer
give). So:

- stop before step k's update: step k is dropped (its rollout too; with async rollout
  the checkpoint keeps step k's first generation batch, which the scheduler records)
  and the state after step k - 1 is saved as step k - 1, the data position and sampling
  RNG as they were before step k's rollout (`state_before`), unless that checkpoint
  exists already. The resumed run redoes step k exactly as the uninterrupted one would.
- stop once the update has begun: the update finishes (a stop arriving during it is
  seen after it), the weight sync is skipped, and the step is saved as step k with its
  metrics row; the resumed run sends those weights to the engine in `initial_sync`.

Either way each step's metrics are written once, by the run that trained it, and
`--resume` continues at the step after the checkpoint: no step twice, none skipped.
The time from the signal to the checkpoint is at most one generation batch or one
update, plus the save; `archer submit` derives its signal lead from that
(archer_mcore/plan/stop.py).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from archer_mcore.actor.checkpoint_store import latest_valid_checkpoint
from archer_mcore.config import AlgorithmConfig, Config
from archer_mcore.parallel.ranks import any_rank
from archer_mcore.train.advantage_batch import AdvantageSettings, ScoredGroup, build_batch
from archer_mcore.train.components import Components, build_components
from archer_mcore.train.dynamic_sampling import SamplingOutcome
from archer_mcore.train.held_out import evaluate_held_out
from archer_mcore.train.log import log as user_log
from archer_mcore.train.progress import PhaseTimer
from archer_mcore.train.protocols import RolloutScheduler
from archer_mcore.train.rollout_scheduler import make_rollout_scheduler
from archer_mcore.train.run_dir import NonFiniteParametersError, parameters_finite
from archer_mcore.train.sampling import train_sampling_params
from archer_mcore.train.signals import StepAbandoned, StopCheck, StopRequest
from archer_mcore.train.step_metrics import StepResults, sampling_metrics, step_metrics
from archer_mcore.train.update import (
    NonFiniteGuard,
    NonFiniteLossError,
    score_old_policy,
    update_policy,
)

log = logging.getLogger("archer.train")


@dataclass(kw_only=True)
class TrainSummary:
    """What a run did: its last step, why it stopped, skipped updates, held-out
    accuracy per evaluated step and the newest checkpoint."""

    steps_done: int
    stopped_by: str | None = None  # signal name, or None when the run finished
    skipped_updates: int = 0
    eval_history: list[tuple[int, float]] = field(default_factory=list)  # (step, accuracy)
    last_checkpoint: str | None = None
    saved_step: int | None = None  # the step of `last_checkpoint`
    last_save_s: float = field(default_factory=time.monotonic)  # monotonic clock, seconds


def train(cfg: Config, resume: bool = False, components: Components | None = None) -> TrainSummary:
    """Run `train.steps` RL steps (from the newest checkpoint with `resume`)."""
    c = components or build_components(cfg)
    params = train_sampling_params(cfg)
    summary = TrainSummary(steps_done=0)
    guard = NonFiniteGuard(cfg.train.max_nonfinite_in_a_row)
    try:
        start, state = resume_run(c, resume, summary)
        # Where each step's groups come from: generated in the step, or (rollout.async_steps
        # = 1) on a background thread while the previous step trains.
        rollout = make_rollout_scheduler(cfg, c, params, start)
        try:
            rollout.load_state_dict(state)
            rollout.initial_sync()
            if cfg.eval.every and start == 0:  # the baseline the run is measured against
                evaluate_baseline(cfg, c, summary)
            with StopRequest() as request:
                stop = StopCheck(request)
                for step in range(start + 1, cfg.train.steps + 1):
                    timer = PhaseTimer()
                    step_start = time.perf_counter()
                    try:
                        metrics = rl_step(
                            cfg,
                            c,
                            rollout,
                            step,
                            timer=timer,
                            guard=guard,
                            summary=summary,
                            stop=stop,
                        )
                    except StepAbandoned as abandoned:
                        save_before_step(cfg, c, rollout, summary, abandoned=abandoned, stop=stop)
                        break
                    # 6. Eval, checkpoint, report.
                    if finish_step(
                        cfg,
                        c,
                        rollout,
                        summary,
                        step=step,
                        metrics=metrics,
                        timer=timer,
                        step_start=step_start,
                        stop=stop,
                    ):
                        break
        finally:
            rollout.close()
    except (NonFiniteLossError, NonFiniteParametersError):
        c.close(delete_push_group=False)  # the last good checkpoint stays
        raise
    report_eval_change(c, summary)
    c.close(delete_push_group=summary.stopped_by is None)
    return summary


def rl_step(
    cfg: Config,
    c: Components,
    rollout: RolloutScheduler,
    step: int,
    *,
    timer: PhaseTimer,
    guard: NonFiniteGuard,
    summary: TrainSummary,
    stop: StopCheck | None = None,
) -> dict[str, float]:
    """One RL step up to its metrics: collect -> advantages -> log-probs -> update ->
    sync. A step whose groups the filter all dropped stops after collecting.

    `stop` is checked at each boundary (module docstring): before the update an agreed
    stop raises StepAbandoned; after it, the sync is skipped (the caller saves)."""
    t, a = cfg.train, cfg.algorithm

    def boundary(phase: str) -> None:
        if stop is not None:
            stop.before_update(step, phase)

    # 1. Collect: rollout and reward, with the group filter / dynamic sampling
    #    (train/collect.py; generated ahead on a thread with rollout.async_steps = 1).
    outcome = rollout.collect(step, timer, boundary)
    boundary("collect")
    failures = c.reward_failures()
    if not outcome.groups:  # nothing to train on
        log.warning("step %d: every group was all-correct or all-wrong; no update", step)
        return sampling_metrics(outcome, failures)
    say_if_partial(cfg, outcome, step)

    # 2. Rewards and advantages (GRPO; DAPO's overlong shaping when enabled).
    batch = build_batch(outcome.groups, settings=advantage_settings(a), pad_id=c.pad_id)

    # 3. Old and reference log-probs, forward only (colocated: the engine yields).
    c.hand_devices_to_training()
    with timer("logprobs"):
        old = score_old_policy(c.policy, batch, cfg.rollout.tis_cap)
    try:
        boundary("logprobs")
    except StepAbandoned:  # saved as every checkpoint is: devices handed back
        c.hand_devices_to_rollout()
        raise

    # 4. The update: ppo_epochs passes over mini-batches of whole groups.
    with timer("update"):
        updates, skipped = update_policy(
            c.policy,
            old,
            groups=len(outcome.groups),
            group_size=cfg.rollout.n_samples_per_prompt,
            algorithm=a,
            train=t,
            step=step,
            guard=guard,
            last_checkpoint=summary.last_checkpoint,
        )
    summary.skipped_updates += skipped
    ensure_finite_parameters(c, step, summary)

    # 5. Weight sync to the rollout engine, which then takes the devices back. Not when
    #    the run stops: the checkpoint is written first, and the next run syncs at start.
    if stop is not None and stop.agreed():
        rollout.skip_sync(step)
        sent = 0
    else:
        with timer("sync"):
            sent = rollout.sync_weights(step)
    c.hand_devices_to_rollout()

    results = StepResults(
        outcome=outcome,
        reward_failures=failures,
        batch=batch,
        old_logp=old.logp,
        tis_cap=cfg.rollout.tis_cap,
        updates=updates,
        skipped_updates=skipped,
        ppo_epochs=t.ppo_epochs,
        sync_bytes=sent,
    )
    return step_metrics(results, timer)


# ----------------------------------------------------------------------------- phases
def advantage_settings(a: AlgorithmConfig) -> AdvantageSettings:
    """`build_batch`'s reward and advantage settings: reward_correct, reward_incorrect,
    norm_adv_by_std, and overlong = (max_length, cache_length) when DAPO's overlong
    shaping is on, else None."""
    overlong = (a.overlong_max_length, a.overlong_cache_length) if a.overlong_shaping else None
    return AdvantageSettings(
        reward_correct=a.reward_correct,
        reward_incorrect=a.reward_incorrect,
        norm_adv_by_std=a.norm_adv_by_std,
        overlong=overlong,
    )


def say_if_partial(cfg: Config, outcome: SamplingOutcome[ScoredGroup], step: int) -> None:
    """Dynamic sampling that hit its cap trains on fewer groups than a full step: say so."""
    if not outcome.full:
        a, t = cfg.algorithm, cfg.train
        user_log.info(
            f"step {step}: dynamic sampling hit its cap of {a.max_generation_batches} "
            f"generation batches; training on {len(outcome.groups)} of "
            f"{t.prompts_per_step} groups"
        )


def resume_run(c: Components, resume: bool, summary: TrainSummary) -> tuple[int, dict[str, Any]]:
    """With `resume`: policy, optimizer, RNG and the data position from the newest
    valid checkpoint (damaged ones are skipped and named). Returns the step done and
    the checkpoint's extra state ({} when starting fresh)."""
    if not resume:
        return 0, {}

    def skipped(path: Path, reason: str) -> None:
        user_log.info(f"--resume: skipping damaged checkpoint {path.name}: {reason}")

    latest = latest_valid_checkpoint(c.checkpoint_root, report=skipped)
    if latest is None:
        user_log.info(f"--resume: no checkpoint under {c.checkpoint_root}; starting fresh")
        return 0, {}
    state = c.policy.load_checkpoint(latest)
    start = int(state["step"])
    c.prompts.load_state_dict(state["sampler"])
    c.set_rollout_rng_state(state.get("rollout_rng"))
    summary.skipped_updates = int(state.get("skipped_updates", 0))
    summary.last_checkpoint = str(latest)
    summary.saved_step = start
    user_log.info(f"resumed from {latest} (step {start})")
    return start, state


def evaluate_baseline(cfg: Config, c: Components, summary: TrainSummary) -> None:
    """The held-out accuracy before any RL step (step 0)."""
    ev = evaluate_held_out(cfg, c, 0)
    if "eval/accuracy" in ev:
        summary.eval_history.append((0, ev["eval/accuracy"]))
        user_log.info(f"step 0/{cfg.train.steps} | eval acc {ev['eval/accuracy']:.3f}")


def ensure_finite_parameters(c: Components, step: int, summary: TrainSummary) -> None:
    """Never sync or checkpoint NaN/inf weights: stop, the last good checkpoint stays."""
    if not parameters_finite(c.policy.unwrapped()):
        raise NonFiniteParametersError(
            f"non-finite weights after the update of step {step}; stopping before "
            f"it is saved. Last good checkpoint: {summary.last_checkpoint or 'none'}"
        )


def save_checkpoint(
    cfg: Config,
    c: Components,
    rollout: RolloutScheduler,
    summary: TrainSummary,
    *,
    step: int,
    rollout_state: dict[str, Any] | None = None,
) -> None:
    """Policy, optimizer and RNG, plus the data position, the engine's sampling RNG (and
    with async rollout the next step's batch in flight) and the skipped-update count,
    under checkpoint_root/step_<step>. `rollout_state`: the scheduler's state to save
    instead of its current `checkpoint_state(step)` (a stop before step + 1's update)."""
    extra = {
        "step": step,
        **(rollout.checkpoint_state(step) if rollout_state is None else rollout_state),
        "skipped_updates": summary.skipped_updates,
    }
    path = c.policy.save_checkpoint(c.checkpoint_root, extra, cfg.checkpoint.keep_last, step=step)
    summary.last_checkpoint = str(path)
    summary.saved_step = step


def save_before_step(
    cfg: Config,
    c: Components,
    rollout: RolloutScheduler,
    summary: TrainSummary,
    *,
    abandoned: StepAbandoned,
    stop: StopCheck,
) -> None:
    """Every rank agreed to stop before step k = `abandoned.step`'s update: the policy
    and optimizer are still step k - 1's, so step k - 1 is saved (with the data position
    and sampling RNG from before step k's rollout) unless its checkpoint exists already
    (saved at its end, or the one this run resumed from). Nothing is saved when no step
    has been trained (k = 1 of a fresh run: a resume starts fresh, as this run did)."""
    k = abandoned.step
    done = k - 1
    summary.stopped_by = stop.signal_name
    if summary.saved_step != done and done > 0:
        state = rollout.state_before(k)
        t0 = time.monotonic()
        save_checkpoint(cfg, c, rollout, summary, step=done, rollout_state=state)
        summary.last_save_s = time.monotonic()
        log.info("checkpoint of step %d written in %.1f s", done, summary.last_save_s - t0)
    where = (
        f"checkpoint written at step {done} ({summary.last_checkpoint})"
        if summary.saved_step == done
        else "no step trained yet, nothing to save"
    )
    user_log.info(
        f"received {summary.stopped_by}: {where}; step {k} dropped before its "
        f"update (stopped after {abandoned.phase}); exiting"
    )


def finish_step(
    cfg: Config,
    c: Components,
    rollout: RolloutScheduler,
    summary: TrainSummary,
    *,
    step: int,
    metrics: dict[str, float],
    timer: PhaseTimer,
    step_start: float,
    stop: StopCheck,
) -> bool:
    """Eval, checkpoint and report the step; True when a stop signal ends the run.

    A stop agreed now (a signal during or after the update or the sync) saves the step
    at once: the step's periodic eval is skipped (with the sync skipped the engine does
    not hold this step's weights, and the save must not wait for an evaluation)."""
    stopping = stop.agreed()  # a signal may reach the ranks at different times
    if cfg.eval.every and step % cfg.eval.every == 0 and not stopping:
        with timer("eval"), rollout.exclusive():
            ev = evaluate_held_out(cfg, c, step)
        metrics.update(ev)
        if "eval/accuracy" in ev:
            summary.eval_history.append((step, ev["eval/accuracy"]))
    summary.steps_done = step
    ck = cfg.checkpoint
    periodic = ck.save_every and step % ck.save_every == 0
    # the ranks' clocks differ: any rank whose interval has passed makes all save
    timed = ck.every_minutes > 0 and any_rank(
        time.monotonic() - summary.last_save_s >= 60.0 * ck.every_minutes
    )
    if stopping or periodic or timed or step == cfg.train.steps:
        with timer("checkpoint"):
            save_checkpoint(cfg, c, rollout, summary, step=step)
        summary.last_save_s = time.monotonic()
    metrics.update(rollout.step_metrics(step, timer, step_start, time.perf_counter()))
    metrics["time/step"] = time.perf_counter() - step_start
    c.report(step, metrics, timer)
    if stopping:
        summary.stopped_by = stop.signal_name
        user_log.info(
            f"received {summary.stopped_by}: checkpoint written at step {step} "
            f"({summary.last_checkpoint}); exiting"
        )
    return stopping


def report_eval_change(c: Components, summary: TrainSummary) -> None:
    """The held-out accuracy's change from the first to the last evaluation."""
    if len(summary.eval_history) >= 2:
        (s0, a0), (s1, a1) = summary.eval_history[0], summary.eval_history[-1]
        user_log.info(
            f"held-out accuracy: {a0:.3f} at step {s0} -> {a1:.3f} at step {s1} "
            f"({100 * (a1 - a0):+.1f} points)"
        )
