"""The collect phase of an RL step: rollout and reward for the step's prompts, with
the group filter / DAPO's dynamic sampling (`dynamic_sampling.collect_groups`).

`collect_step_groups` is the loop's single entry point for this phase: another way of
producing the step's scored groups (e.g. an asynchronous rollout) replaces this call.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from archer_mcore.config import Config
from archer_mcore.data.prompt_dataset import PromptExample
from archer_mcore.parallel.ranks import broadcast_rollout
from archer_mcore.rollout.types import RolloutError, SamplingParams
from archer_mcore.train.advantage_batch import ScoredGroup
from archer_mcore.train.components import Components
from archer_mcore.train.dynamic_sampling import SamplingOutcome, collect_groups
from archer_mcore.train.progress import PhaseTimer
from archer_mcore.train.scoring import score_groups
from archer_mcore.train.signals import stop_requested

log = logging.getLogger("archer.train")


def rollout_and_score(
    c: Components,
    prompts: list[PromptExample],
    *,
    n: int,
    params: SamplingParams,
    timer: PhaseTimer,
) -> list[ScoredGroup]:
    """Rank 0: `n` samples for each prompt from the engine (phase "rollout"), scored
    (phase "reward")."""
    assert c.engine is not None and c.scorer is not None
    with timer("rollout"):
        batch = c.engine.generate([p.prompt_ids for p in prompts], n, params)
    with timer("reward"):
        return score_groups(c.scorer, c.tokenizer, prompts, batch)


def generate_scored_groups(
    c: Components, n_prompts: int, *, n: int, params: SamplingParams, timer: PhaseTimer
) -> list[ScoredGroup]:
    """Rank 0 generates `n` samples for each of the next `n_prompts` prompts and scores
    them (phases "rollout" and "reward"); every rank gets the groups."""
    prompts = c.prompts.next_batch(n_prompts)
    groups = None
    if c.is_main:
        try:
            groups = rollout_and_score(c, prompts, n=n, params=params, timer=timer)
        except RolloutError as exc:
            # Slurm's pre-emption SIGTERM reaches every process of the job, the rollout
            # servers too: once this rank has a stop signal, a rollout that failed is
            # the step's dropped rollout (the next boundary stops the run and saves the
            # previous step), not a crash that loses the checkpoint
            if not stop_requested():
                raise
            log.warning("rollout failed after a stop signal, dropped: %s", exc)
            groups = []
    return broadcast_rollout(groups)


def collect_step_groups(
    cfg: Config,
    c: Components,
    params: SamplingParams,
    timer: PhaseTimer,
    *,
    boundary: Callable[[str], None] | None = None,
) -> SamplingOutcome[ScoredGroup]:
    """The step's groups to train on, generated now (see `collect_with`).

    `boundary("rollout")` runs on every rank after each generation batch (rank 0's
    groups, generated and scored, have reached every rank): the loop's stop check,
    which raises to drop the step's unfinished rollout (train/signals.py)."""
    n = cfg.rollout.n_samples_per_prompt

    def generate(k: int) -> list[ScoredGroup]:
        groups = generate_scored_groups(c, k, n=n, params=params, timer=timer)
        if boundary is not None:
            boundary("rollout")
        return groups

    return collect_with(cfg, generate)


def collect_with(
    cfg: Config, generate: Callable[[int], list[ScoredGroup]]
) -> SamplingOutcome[ScoredGroup]:
    """`train.prompts_per_step` groups of `rollout.n_samples_per_prompt` samples from
    `generate(k)` (k prompts' scored groups), filtered by `algorithm.group_filter` on
    each group's reward signal (its graded scores, else its correctness; refilled from
    at most `algorithm.max_generation_batches` generation batches)."""
    t, a = cfg.train, cfg.algorithm
    return collect_groups(
        generate,
        lambda g: g.reward_signal,
        t.prompts_per_step,
        a.group_filter,
        max_generation_batches=a.max_generation_batches,
    )
