"""The sampling settings of the run's two kinds of generation: training rollouts
(`rollout.*`, the engine's running RNG) and held-out evaluation (`eval.*`, a fixed
seed so that every evaluation, in the loop or in `archer eval`, samples alike)."""

from __future__ import annotations

from archer_mcore.config import Config
from archer_mcore.rollout.types import SamplingParams


def train_sampling_params(cfg: Config) -> SamplingParams:
    """Training rollouts: `rollout.temperature`, `top_p`, `top_k`, `max_new_tokens` and
    `stop_token_ids`; no seed (the engine's running sampling stream)."""
    r = cfg.rollout
    return SamplingParams(
        temperature=r.temperature,
        top_p=r.top_p,
        top_k=r.top_k,
        max_new_tokens=r.max_new_tokens,
        stop_token_ids=tuple(r.stop_token_ids),
    )


def eval_sampling_params(cfg: Config) -> SamplingParams:
    """The held-out evaluation's sampling settings (the loop's and `archer eval`'s):
    `eval.temperature`, `top_p`, `max_new_tokens`, seed `train.seed` + 7."""
    e = cfg.eval
    return SamplingParams(
        temperature=e.temperature,
        top_p=e.top_p,
        max_new_tokens=e.max_new_tokens,
        stop_token_ids=tuple(cfg.rollout.stop_token_ids),
        seed=cfg.train.seed + 7,
    )
