"""The RL loop: one step is rollout -> reward -> advantages -> log-probs -> update -> sync.

Read top to bottom; the components (policy, engine, rewards, data, metrics) are built
in `components.py` and sit behind small interfaces.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from archer_mcore.actor.checkpoint_store import latest_valid_checkpoint
from archer_mcore.actor.policy_batch import with_fields
from archer_mcore.algo.rollout_correction import mismatch_metrics, truncated_is_weights
from archer_mcore.algo.token_groups import forking_mask_of_rows
from archer_mcore.config import AlgorithmConfig, Config
from archer_mcore.metrics.repetition import mean_ngram_repetition_rate
from archer_mcore.rollout.types import SamplingParams
from archer_mcore.train.batch import ScoredGroup, TrainBatch, build_batch, group_rows
from archer_mcore.train.components import Components, any_rank, build_components
from archer_mcore.train.progress import PhaseTimer
from archer_mcore.train.rollout_scheduler import make_rollout_scheduler
from archer_mcore.train.run_dir import NonFiniteParametersError, parameters_finite
from archer_mcore.train.signals import StopRequest

log = logging.getLogger("archer.train")


@dataclass
class TrainSummary:
    steps_done: int
    stopped_by: str | None = None  # signal name, or None when the run finished
    skipped_updates: int = 0
    eval_history: list[tuple[int, float]] = field(default_factory=list)  # (step, accuracy)
    last_checkpoint: str | None = None


class NonFiniteLossError(RuntimeError):
    """Too many consecutive updates with a non-finite loss; the last good checkpoint stays."""


def rollout_params(cfg: Config) -> SamplingParams:
    r = cfg.rollout
    return SamplingParams(
        temperature=r.temperature,
        top_p=r.top_p,
        top_k=r.top_k,
        max_new_tokens=r.max_new_tokens,
        stop_token_ids=tuple(r.stop_token_ids),
    )


def rollout_metrics(
    groups: list[ScoredGroup], generated: list[ScoredGroup], batch: TrainBatch
) -> dict[str, float]:
    """Metrics of the trained groups, except accuracy: over everything generated."""
    lengths = [len(s.token_ids) for g in groups for s in g.samples]
    count = max(1, len(lengths))
    n_generated = max(1, sum(len(g.correct) for g in generated))
    return {
        "reward/mean": float(batch.rewards.mean()),
        "reward/std": float(batch.rewards.std()) if batch.rewards.numel() > 1 else 0.0,
        "response/repetition": mean_ngram_repetition_rate(
            [s.token_ids for g in groups for s in g.samples]
        ),
        "reward/accuracy": sum(sum(g.correct) for g in generated) / n_generated,
        "reward/accuracy_trained": sum(sum(g.correct) for g in groups) / count,
        "response/length_mean": sum(lengths) / count,
        "response/length_max": float(max(lengths, default=0)),
        "response/clip_ratio": sum(s.finish_reason == "length" for g in groups for s in g.samples)
        / count,
    }


def minibatch_selection(
    a: AlgorithmConfig, entropy: torch.Tensor, mask: torch.Tensor, rows: torch.Tensor
) -> torch.Tensor | None:
    """The forking-token mask [B, L] for the mini-batch `rows`, or None.

    `algorithm.forking_scope` = mini_batch: the top-rho tokens of the whole mini-batch
    (the rows of every data-parallel rank together), ranked by `entropy` [B, L], the
    entropies the old policy gave in the scoring pass (for the first mini-batch of the
    first epoch that is the policy being updated). micro_batch (or a token rule other
    than forking): None, and the loss selects within each micro-batch by the current
    policy's entropies.
    """
    if a.token_rule != "forking" or a.forking_scope != "mini_batch":
        return None
    return forking_mask_of_rows(entropy, mask, rows, a.forking_rho)


def _mean(rows: list[dict[str, float]]) -> dict[str, float]:
    keys = sorted(set().union(*rows)) if rows else []
    return {k: sum(r[k] for r in rows if k in r) / sum(k in r for r in rows) for k in keys}


def train(cfg: Config, resume: bool = False, components: Components | None = None) -> TrainSummary:
    c = components or build_components(cfg)
    t, a = cfg.train, cfg.algorithm
    params = rollout_params(cfg)
    n = cfg.rollout.n_samples_per_prompt
    summary = TrainSummary(steps_done=0)

    # Resume: policy, optimizer, RNG and the data position from the newest checkpoint.
    start = 0

    def skipped(path: Path, reason: str) -> None:
        if c.is_main:
            print(f"--resume: skipping damaged checkpoint {path.name}: {reason}", flush=True)

    latest = latest_valid_checkpoint(c.checkpoint_root, report=skipped) if resume else None
    if latest is not None:
        state = c.policy.load_checkpoint(latest)
        start = int(state["step"])
        c.prompts.load_state_dict(state["sampler"])
        c.set_rollout_rng_state(state.get("rollout_rng"))
        summary.skipped_updates = int(state.get("skipped_updates", 0))
        summary.last_checkpoint = str(latest)
        if c.is_main:
            print(f"resumed from {latest} (step {start})", flush=True)
    elif resume and c.is_main:
        print(f"--resume: no checkpoint under {c.checkpoint_root}; starting fresh", flush=True)
    # Where each step's groups come from: generated in the step, or (rollout.async_steps
    # = 1) on a background thread while the previous step trains.
    rollout = make_rollout_scheduler(cfg, c, params, start)
    if latest is not None:
        rollout.load_state_dict(state)
    rollout.initial_sync()
    if cfg.eval.every and start == 0:  # the baseline the run is measured against
        ev = c.evaluate(0)
        if "eval/accuracy" in ev:
            summary.eval_history.append((0, ev["eval/accuracy"]))
            if c.is_main:
                print(f"step 0/{t.steps} | eval acc {ev['eval/accuracy']:.3f}", flush=True)

    def save(step: int) -> None:
        extra = {
            "step": step,
            **rollout.checkpoint_state(step),  # sampler, rollout_rng (+ the batch in flight)
            "skipped_updates": summary.skipped_updates,
        }
        path = c.policy.save_checkpoint(
            c.checkpoint_root, extra, cfg.checkpoint.keep_last, step=step
        )
        summary.last_checkpoint = str(path)

    def finish_step(
        step: int,
        metrics: dict[str, float],
        timer: PhaseTimer,
        step_start: float,
        stop: StopRequest,
    ) -> bool:
        """Eval, checkpoint and report the step; True when a stop signal ends the run."""
        if cfg.eval.every and step % cfg.eval.every == 0:
            with timer("eval"), rollout.exclusive():
                ev = c.evaluate(step)
            metrics.update(ev)
            if "eval/accuracy" in ev:
                summary.eval_history.append((step, ev["eval/accuracy"]))
        summary.steps_done = step
        stopping = any_rank(bool(stop))  # a signal may reach the ranks at different steps
        periodic = cfg.checkpoint.save_every and step % cfg.checkpoint.save_every == 0
        if stopping or periodic or step == t.steps:
            with timer("checkpoint"):
                save(step)
        metrics.update(rollout.step_metrics(step, timer, step_start, time.perf_counter()))
        metrics["time/step"] = time.perf_counter() - step_start
        c.report(step, metrics, timer)
        if stopping:
            summary.stopped_by = stop.signal_name or "signal on another rank"
            if c.is_main:
                print(
                    f"received {summary.stopped_by}: checkpoint written at step {step} "
                    f"({summary.last_checkpoint}); exiting",
                    flush=True,
                )
        return stopping

    nonfinite_in_a_row = 0
    with StopRequest() as stop:
        for step in range(start + 1, t.steps + 1):
            timer = PhaseTimer()
            step_start = time.perf_counter()

            # 1. Rollout and reward, with the group filter / dynamic sampling.
            outcome = rollout.collect(step, timer)
            metrics: dict[str, float] = {
                "sampling/drop_rate": outcome.drop_rate,
                "sampling/generation_batches": float(outcome.generation_batches),
                "reward/failures": float(c.reward_failures()),
            }
            if not outcome.groups:
                log.warning("step %d: every group was all-correct or all-wrong; no update", step)
                if finish_step(step, metrics, timer, step_start, stop):
                    break
                continue
            if not outcome.full:
                print(
                    f"step {step}: dynamic sampling hit its cap of {a.max_generation_batches} "
                    f"generation batches; training on {len(outcome.groups)} of "
                    f"{t.prompts_per_step} groups",
                    flush=True,
                )

            # 2. Rewards and advantages (GRPO; DAPO's overlong shaping when enabled).
            overlong = (
                (a.overlong_max_length, a.overlong_cache_length) if a.overlong_shaping else None
            )
            batch = build_batch(
                outcome.groups,
                a.reward_correct,
                a.reward_incorrect,
                a.norm_adv_by_std,
                overlong,
                c.pad_id,
            )
            metrics.update(rollout_metrics(outcome.groups, outcome.all_groups, batch))

            # 3. Old and reference log-probs, forward only (colocated: the engine yields).
            c.hand_devices_to_training()
            with timer("logprobs"):
                old_logp, old_entropy = c.policy.compute_logprobs(batch.policy)
                ref_logp = (
                    c.policy.compute_ref_logprobs(batch.policy)
                    if c.policy.reference is not None
                    else None
                )
            # Rollout/training mismatch: metrics, and truncated importance sampling
            # (w = min(pi_old / pi_rollout, cap) on the policy gradient) when capped.
            mask = batch.policy.response_mask
            cap = cfg.rollout.tis_cap
            weights = truncated_is_weights(old_logp, batch.rollout_logp, cap, mask) if cap else None
            full = with_fields(
                batch.policy, old_logp=old_logp, ref_logp=ref_logp, token_weights=weights
            )
            mism = mismatch_metrics(old_logp, batch.rollout_logp, mask, cap)
            metrics["rollout/mismatch_kl_k3"] = mism["mismatch_kl_k3"]
            diff = (old_logp - batch.rollout_logp)[mask]
            metrics["rollout/logprob_abs_diff"] = float(diff.abs().mean()) if diff.numel() else 0.0
            if cap:
                metrics["rollout/tis_weight_mean"] = mism["tis_weight_mean"]
                metrics["rollout/tis_clipped_fraction"] = mism["tis_clipped_fraction"]

            # 4. The update: ppo_epochs passes over mini-batches of whole groups; each
            #    data-parallel rank takes its share of every mini-batch.
            updates: list[dict[str, float]] = []
            skipped_before = summary.skipped_updates
            with timer("update"):
                groups_total = len(outcome.groups)
                # The configured number of updates per epoch, however many groups the
                # filter kept (fewer groups make smaller mini-batches, not more of them).
                n_mb = min(groups_total, t.prompts_per_step // t.mini_batch_prompts)
                per_mb = math.ceil(groups_total / n_mb)
                for epoch in range(t.ppo_epochs):
                    g = torch.Generator().manual_seed(t.seed * 1_000_003 + step * 101 + epoch)
                    order = torch.randperm(groups_total, generator=g)
                    for lo in range(0, groups_total, per_mb):
                        rows = group_rows(order[lo : lo + per_mb], n)
                        share = rows[c.policy.dp_rank :: c.policy.dp_size]
                        selection = minibatch_selection(a, old_entropy, mask, rows)
                        mini = full if selection is None else with_fields(full, selection=selection)
                        m = c.policy.train_step(mini.rows(share), a)
                        updates.append(m)
                        if m.get("update_skipped") or not math.isfinite(m.get("loss", 0.0)):
                            nonfinite_in_a_row += 1
                            summary.skipped_updates += 1
                            log.warning(
                                "step %d: non-finite loss or gradient, update skipped (%d in a row)",
                                step,
                                nonfinite_in_a_row,
                            )
                            if nonfinite_in_a_row >= t.max_nonfinite_in_a_row:
                                c.close(delete_push_group=False)
                                raise NonFiniteLossError(
                                    f"{nonfinite_in_a_row} non-finite updates in a row at step "
                                    f"{step}; stopping. Last good checkpoint: "
                                    f"{summary.last_checkpoint or 'none'}"
                                )
                        else:
                            nonfinite_in_a_row = 0
            if not parameters_finite(c.policy.unwrapped()):
                # Never sync or checkpoint NaN/inf weights: the last good checkpoint stays.
                c.close(delete_push_group=False)
                raise NonFiniteParametersError(
                    f"non-finite weights after the update of step {step}; stopping before "
                    f"it is saved. Last good checkpoint: {summary.last_checkpoint or 'none'}"
                )
            for k, v in _mean(updates).items():
                metrics[k if "/" in k else f"train/{k}"] = v
            metrics["train/skipped_steps"] = float(summary.skipped_updates - skipped_before)
            if "share/forking" in metrics:
                metrics["forking/share"] = metrics["share/forking"]
            trained = batch.num_response_tokens * t.ppo_epochs
            metrics["throughput/train_tokens"] = float(trained)
            metrics["throughput/train_tokens_per_s"] = trained / max(1e-9, timer.seconds["update"])
            generated = sum(len(s.token_ids) for grp in outcome.all_groups for s in grp.samples)
            metrics["throughput/rollout_tokens"] = float(generated)
            metrics["throughput/rollout_tokens_per_s"] = generated / max(
                1e-9, timer.seconds.get("rollout", 0.0)
            )

            # 5. Weight sync to the rollout engine, which then takes the devices back.
            with timer("sync"):
                metrics["sync/bytes"] = float(rollout.sync_weights(step))
            c.hand_devices_to_rollout()

            # 6. Eval, checkpoint, report.
            if finish_step(step, metrics, timer, step_start, stop):
                break
    if c.is_main and len(summary.eval_history) >= 2:
        (s0, a0), (s1, a1) = summary.eval_history[0], summary.eval_history[-1]
        print(
            f"held-out accuracy: {a0:.3f} at step {s0} -> {a1:.3f} at step {s1} "
            f"({100 * (a1 - a0):+.1f} points)",
            flush=True,
        )
    rollout.close()
    c.close(delete_push_group=summary.stopped_by is None)
    return summary
