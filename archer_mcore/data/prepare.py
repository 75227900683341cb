"""The run's data, prepared from its config: tokenizer, training and held-out files
(the synthetic task's when no files are given), reward routing, the resumable prompt
stream, and the warm start's demonstration pairs.

Everything here is deterministic in the config (and `train.seed`), so every rank of a
job prepares the same data; files are written atomically because ranks may race.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from archer_mcore.config import Config, ConfigError
from archer_mcore.config.errors import clip
from archer_mcore.data.prompt_dataset import PromptDataset, PromptExample
from archer_mcore.data.sampler import EpochSampler

if TYPE_CHECKING:
    from archer_mcore.rewards.registry import RewardRegistry


def build_tokenizer(cfg: Config, cache: Path) -> Any:
    """`model.tokenizer`, else `model.path`'s tokenizer, else the synthetic task's
    (written under `cache`/tokenizer). Returns a transformers tokenizer."""
    from transformers import AutoTokenizer

    source = cfg.model.tokenizer or cfg.model.path
    if not source:
        from archer_mcore.data.arithmetic_tokenizer import build_arithmetic_tokenizer

        source = str(build_arithmetic_tokenizer(cache / "tokenizer"))
    return AutoTokenizer.from_pretrained(source)


def synthetic_files(cfg: Config, cache: Path) -> tuple[list[str], list[str]]:
    """Write the synthetic task's train and held-out files (no shared problem)."""
    from archer_mcore.data.synthetic import (
        ArithmeticTaskConfig,
        generate_arithmetic_rows,
    )

    task = ArithmeticTaskConfig(**asdict(cfg.data.synthetic))
    train_rows = generate_arithmetic_rows(cfg.data.synthetic_train_size, task, seed=cfg.train.seed)
    seen = {r["extra_info"]["expression"] for r in train_rows}
    candidates = generate_arithmetic_rows(
        4 * cfg.data.synthetic_eval_size, task, seed=cfg.train.seed + 1
    )
    eval_rows = [r for r in candidates if r["extra_info"]["expression"] not in seen]
    eval_rows = eval_rows[: cfg.data.synthetic_eval_size]
    if not eval_rows:
        raise ConfigError(
            "data.synthetic: every problem of this task is in the training set, so no "
            "held-out problem is left; raise data.synthetic.max_value or max_operands, or "
            "lower data.synthetic_train_size"
        )
    digest = hashlib.sha256(json.dumps(asdict(task), sort_keys=True).encode()).hexdigest()[:12]
    tag = f"synthetic-{cfg.train.seed}-{cfg.data.synthetic_train_size}-{digest}"
    return [write_atomic(train_rows, cache / tag / "train.jsonl")], [
        write_atomic(eval_rows, cache / tag / "eval.jsonl")
    ]


def data_files(cfg: Config, cache: Path) -> tuple[list[str], list[str]]:
    """(training files, held-out files) of the run.

    Training: `data.train_files`, or the synthetic task's training file when that list is
    empty. Held-out: `data.eval_files` whenever it is given (also with synthetic
    training data); otherwise the synthetic task's held-out file when training is
    synthetic, and none when training is on the user's files. Every file must exist.
    """
    d = cfg.data
    if d.train_files:
        train_files, eval_files = list(d.train_files), list(d.eval_files)
    else:
        train_files, synthetic_eval = synthetic_files(cfg, cache)
        eval_files = list(d.eval_files) or synthetic_eval
    for key, files in (("data.train_files", train_files), ("data.eval_files", eval_files)):
        for f in files:
            if not Path(f).exists():
                raise ConfigError(f"{key}: file {f} does not exist")
    return train_files, eval_files


def write_atomic(rows: list[dict[str, Any]], path: Path) -> str:
    """Every rank may write the same file: write a private temp file, then rename it
    over the target, so that no reader ever sees a half-written file."""
    from archer_mcore.data.synthetic import write_jsonl

    tmp = write_jsonl(rows, path.with_name(f"{path.name}.{os.getpid()}.tmp"))
    os.replace(tmp, path)
    return str(path)


def route_rewards(
    cfg: Config, data: PromptDataset, what: str, registry: RewardRegistry | None = None
) -> PromptDataset:
    """Every row's reward kind, checked at load time (`assign_reward_kinds`); `what`
    names the config key in errors. `registry`: the run's reward registry (built once
    by the trainer); None builds it from `cfg.rewards` (`registry_from_config`)."""
    from archer_mcore.data.prompt_dataset import UnroutedDataError, assign_reward_kinds

    if registry is None:
        from archer_mcore.rewards.config_kinds import registry_from_config

        registry = registry_from_config(cfg.rewards)

    def kind_of(source: str) -> str | None:
        kind = registry.kind_for(source)
        return kind.name if kind is not None else None

    try:
        routed = assign_reward_kinds(data, kind_of, registry.kinds, cfg.data.default_reward_kind)
    except UnroutedDataError as exc:
        raise ConfigError(f"{what}: {exc}") from None
    if len(routed) == 0:
        raise ConfigError(f"{what}: no usable prompt: {routed.report.summary()}")
    return routed


def load_datasets(
    cfg: Config, tokenizer: Any, cache: Path, registry: RewardRegistry | None = None
) -> tuple[PromptDataset, PromptDataset | None]:
    """(training prompts, held-out prompts or None), read, tokenized and reward-routed
    by `registry` (None: built from `cfg.rewards`); ConfigError when no usable training
    prompt is left."""
    train_files, eval_files = data_files(cfg, cache)
    train_data = PromptDataset.from_files(train_files, tokenizer, cfg.data.max_prompt_length)
    if len(train_data) == 0:
        raise ConfigError(f"data.train_files: no usable prompt in {clip(train_files)}")
    eval_data = (
        PromptDataset.from_files(eval_files, tokenizer, cfg.data.max_prompt_length)
        if eval_files
        else None
    )
    if registry is None:
        from archer_mcore.rewards.config_kinds import registry_from_config

        registry = registry_from_config(cfg.rewards)
    train_data = route_rewards(cfg, train_data, "data.train_files", registry)
    eval_data = route_rewards(cfg, eval_data, "data.eval_files", registry) if eval_data else None
    return train_data, eval_data


@dataclass
class PromptStream:
    """The training prompts in the sampler's deterministic, resumable order."""

    dataset: PromptDataset
    sampler: EpochSampler
    offset: int = 0  # prompts before it (the warm start's) are not sampled

    def next_batch(self, k: int) -> list[PromptExample]:
        return [self.dataset[self.offset + i] for i in self.sampler.next_batch(k)]

    def state_dict(self) -> dict[str, Any]:
        return self.sampler.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.sampler.load_state_dict(state)


def warmstart_examples(
    dataset: PromptDataset,
    tokenizer: Any,
    *,
    count: int,
    noise: float,
    seed: int,
    copies: int = 4,
) -> list[tuple[list[int], list[int]]]:
    """(prompt ids, solution ids + eos) pairs from the first `count` prompts.

    Each prompt appears `copies` times, and each copy independently stops after the
    worked steps without the final \\boxed{} answer (which the verifier needs) with
    probability `noise`. The omission is thus a habit of the warm-started policy, not a
    property of particular problems, and RL can unlearn it on problems it never saw.
    The solution comes from the data: it is encoded as plain text (a "<|im_end|>" in it
    stays text; the only eos is the one appended).
    """
    from archer_mcore.data.chat_render import ChatRenderer

    rng = random.Random(seed)
    out = []
    eos = tokenizer.eos_token_id
    renderer = ChatRenderer(tokenizer)
    for i in range(min(count, len(dataset))):
        ex = dataset[i]
        solution = ex.extra_info.get("solution")
        if not solution:
            raise ConfigError(f"warmstart: {ex.source} has no extra_info.solution to imitate")
        steps, boxed, _ = solution.rpartition(" \\boxed{")
        for _ in range(copies):
            text = steps if boxed and rng.random() < noise else solution
            ids = _solution_ids(renderer, text, ex.source)
            out.append((list(ex.prompt_ids), [*ids, eos]))
    return out


def _solution_ids(renderer: Any, text: str, source: str) -> list[int]:
    """A data row's solution text as plain-text ids (ConfigError naming the row when
    the tokenizer cannot encode it without a control token)."""
    from archer_mcore.data.schema import MalformedRow

    try:
        return renderer.encode_plain(text)
    except MalformedRow as err:
        raise ConfigError(f"warmstart: {source}: extra_info.solution: {err}") from None
