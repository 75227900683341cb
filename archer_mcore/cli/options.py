"""Arguments shared by several verbs, and the checkpoint loading `archer eval` and
`archer export` share (heavy imports inside the functions: see cli/main.py)."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from archer_mcore.config import Config, ConfigError


def add_overrides(
    parser: argparse.ArgumentParser,
    help_text: str = "override a dotted config key, e.g. train.steps=10 (repeatable)",
) -> None:
    """`--override/-o KEY=VALUE` (repeatable, into `args.override`): dotted config keys
    set after the YAML."""
    parser.add_argument(
        "--override", "-o", action="append", default=[], metavar="KEY=VALUE", help=help_text
    )


def checkpoint_step_dir(checkpoint: str) -> Path:
    """The verified step directory `--checkpoint` names: a step directory, or a root
    (its latest checkpoint); a ConfigError naming the flag otherwise."""
    from archer_mcore.actor.checkpoint_store import CheckpointError, resolve_checkpoint

    ckpt = Path(checkpoint)
    if not ckpt.exists():
        raise ConfigError(f"--checkpoint: {ckpt} does not exist")
    try:
        step_dir, _ = resolve_checkpoint(ckpt)
    except CheckpointError as exc:
        raise ConfigError(f"--checkpoint: {exc}") from None
    return step_dir


def policy_from_checkpoint(cfg: Config, step_dir: Path, tokenizer: Any) -> tuple[Any, dict]:
    """(policy, HF config): the config's Megatron policy with `step_dir`'s weights
    loaded; a ConfigError naming --checkpoint when they do not fit (e.g. a checkpoint
    of a model of another shape)."""
    from archer_mcore.actor.checkpoint_store import CheckpointError
    from archer_mcore.actor.policy import MegatronPolicy
    from archer_mcore.train.components import _policy_config, hf_config_dict

    hf_config = hf_config_dict(cfg, tokenizer)
    policy = MegatronPolicy.from_hf(cfg.model.path or hf_config, _policy_config(cfg))
    try:
        policy.load_checkpoint(step_dir)
    except CheckpointError as exc:
        raise ConfigError(f"--checkpoint: {exc}") from None
    return policy, hf_config
