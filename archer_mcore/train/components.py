"""Build the RL loop's components from the config: data, policy, engine, rewards, metrics.

Rank layout: every rank holds the Megatron policy; the rollout engine, the reward
scorer and the metrics exporter live on global rank 0, which generates and scores each
batch and broadcasts it to the other ranks.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import sys
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from archer_mcore.config import (
    Config,
    ConfigError,
    check_context_parallel,
    check_position_limit,
)
from archer_mcore.data.prompt_dataset import PromptDataset, PromptExample
from archer_mcore.data.sampler import EpochSampler
from archer_mcore.model.hf_config import model_hf_config, shape_from_hf_config
from archer_mcore.rewards.types import RewardRequest
from archer_mcore.rollout.types import RolloutBatch, SamplingParams
from archer_mcore.train.batch import ScoredGroup
from archer_mcore.train.evaluation import EVAL_PASS_KS, summarize
from archer_mcore.train.progress import PhaseTimer, ProgressBar, prints_step_line, step_line

log = logging.getLogger("archer.train")


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def any_rank(flag: bool) -> bool:
    """True on every rank when `flag` is True on any rank (e.g. a signal that reached
    only some processes), so that collective decisions like a checkpoint agree."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return bool(flag)
    t = torch.tensor([1 if flag else 0], dtype=torch.int32)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def broadcast_object(obj: Any) -> Any:
    """Rank 0's `obj` on every rank (identity without torch.distributed)."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


# ----------------------------------------------------------------------------- data
def build_tokenizer(cfg: Config, cache: Path) -> Any:
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
    return [_write_atomic(train_rows, cache / tag / "train.jsonl")], [
        _write_atomic(eval_rows, cache / tag / "eval.jsonl")
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


def _write_atomic(rows: list[dict[str, Any]], path: Path) -> str:
    """Every rank may write the same file: write a private temp file, then rename it
    over the target, so that no reader ever sees a half-written file."""
    from archer_mcore.data.synthetic import write_jsonl

    tmp = write_jsonl(rows, path.with_name(f"{path.name}.{os.getpid()}.tmp"))
    os.replace(tmp, path)
    return str(path)


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


# ----------------------------------------------------------------------------- model
def hf_config_dict(cfg: Config, tokenizer: Any) -> dict[str, Any]:
    """The policy's HF config: model.path's config.json, or the inline `model.arch`."""
    a = cfg.model.arch
    if not cfg.model.path and len(tokenizer) > a.vocab_size:
        raise ConfigError(
            f"model.arch.vocab_size = {a.vocab_size} is smaller than the tokenizer's "
            f"{len(tokenizer)} tokens"
        )
    return model_hf_config(
        cfg.model,
        token_ids={
            "pad_token_id": tokenizer.pad_token_id,
            "eos_token_id": tokenizer.eos_token_id,
            "bos_token_id": tokenizer.bos_token_id,
        },
    )


def warmstart_examples(
    dataset: PromptDataset, tokenizer: Any, count: int, noise: float, seed: int, copies: int = 4
) -> list[tuple[list[int], list[int]]]:
    """(prompt ids, solution ids + eos) pairs from the first `count` prompts.

    Each prompt appears `copies` times, and each copy independently stops after the
    worked steps without the final \\boxed{} answer (which the verifier needs) with
    probability `noise`. The omission is thus a habit of the warm-started policy, not a
    property of particular problems, and RL can unlearn it on problems it never saw.
    """
    rng = random.Random(seed)
    out = []
    eos = tokenizer.eos_token_id
    for i in range(min(count, len(dataset))):
        ex = dataset[i]
        solution = ex.extra_info.get("solution")
        if not solution:
            raise ConfigError(f"warmstart: {ex.source} has no extra_info.solution to imitate")
        steps, boxed, _ = solution.rpartition(" \\boxed{")
        for _ in range(copies):
            text = steps if boxed and rng.random() < noise else solution
            ids = tokenizer(text, add_special_tokens=False)["input_ids"]
            out.append((list(ex.prompt_ids), [*ids, eos]))
    return out


def score_groups(
    scorer: Any, tokenizer: Any, prompts: Sequence[PromptExample], batch: RolloutBatch
) -> list[ScoredGroup]:
    """Decode every response (without its eos) and score the whole batch in one call;
    group i answers prompts[i]."""
    eos = tokenizer.eos_token_id
    requests = [
        RewardRequest(
            response=tokenizer.decode(
                s.token_ids[:-1] if s.token_ids and s.token_ids[-1] == eos else s.token_ids,
                skip_special_tokens=True,
            ),
            ground_truth=prompt.ground_truth,
            data_source=prompt.data_source,
            kind=prompt.reward_kind,
            extra=dict(prompt.extra_info),
        )
        for prompt, group in zip(prompts, batch.groups)
        for s in group
    ]
    results = iter(scorer.score_batch(requests))
    return [
        ScoredGroup(
            samples=list(group),
            correct=[float(next(results).correct) for _ in group],
            data_source=prompt.data_source,
        )
        for prompt, group in zip(prompts, batch.groups)
    ]


def route_rewards(cfg: Config, data: PromptDataset, what: str) -> PromptDataset:
    """Every row's reward kind, checked at load time (`assign_reward_kinds`)."""
    from archer_mcore.data.prompt_dataset import UnroutedDataError, assign_reward_kinds
    from archer_mcore.rewards.registry import default_registry

    registry = default_registry()

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


def eval_sampling_params(cfg: Config) -> SamplingParams:
    """The held-out evaluation's sampling settings (the loop's and `archer eval`'s)."""
    e = cfg.eval
    return SamplingParams(
        temperature=e.temperature,
        top_p=e.top_p,
        max_new_tokens=e.max_new_tokens,
        stop_token_ids=tuple(cfg.rollout.stop_token_ids),
        seed=cfg.train.seed + 7,
    )


# ----------------------------------------------------------------------------- the bundle
@dataclass
class Components:
    cfg: Config
    tokenizer: Any
    prompts: PromptStream
    eval_data: PromptDataset | None
    policy: Any  # MegatronPolicy
    engine: Any | None  # RolloutEngine, rank 0 only
    scorer: Any | None  # RewardScorer, rank 0 only
    exporter: Any | None  # MetricsExporter, rank 0 only
    checkpoint_root: Path
    pad_id: int
    history: list[dict[str, float]] = field(default_factory=list)
    _failures_reported: int = 0

    @property
    def is_main(self) -> bool:
        return rank() == 0

    # -- rollout + reward --------------------------------------------------------------
    def _score(self, prompts: Sequence[PromptExample], batch: RolloutBatch) -> list[ScoredGroup]:
        assert self.scorer is not None
        return score_groups(self.scorer, self.tokenizer, prompts, batch)

    def generate_groups(
        self, n_prompts: int, n: int, params: SamplingParams, timer: PhaseTimer
    ) -> list[ScoredGroup]:
        """Rank 0 generates and scores the next `n_prompts` prompts; every rank gets them."""
        prompts = self.prompts.next_batch(n_prompts)
        groups = None
        if self.is_main:
            with timer("rollout"):
                batch = self.engine.generate([p.prompt_ids for p in prompts], n, params)
            with timer("reward"):
                groups = self._score(prompts, batch)
        return broadcast_object(groups)

    def reward_failures(self) -> int:
        """Reward faults since the last call (rank 0's count)."""
        if not self.is_main:
            return 0
        total = self.scorer.counters().get("faults", 0)
        new, self._failures_reported = total - self._failures_reported, total
        return new

    def rollout_rng_state(self) -> Any:
        """The engine's running sampling RNG (rank 0; None where it has none), for
        checkpoints: a resumed run then samples what the uninterrupted one would."""
        get = getattr(self.engine, "rng_state", None)
        return get() if self.is_main and get is not None else None

    def set_rollout_rng_state(self, state: Any) -> None:
        put = getattr(self.engine, "set_rng_state", None)
        if self.is_main and put is not None and state is not None:
            put(state)

    # -- weights, eval, metrics ----------------------------------------------------------
    def hand_devices_to_training(self) -> None:
        """Colocated mode: the engine stops generating while the policy trains (an
        engine that can release its memory does so on pause)."""
        if self.is_main and self.cfg.rollout.mode == "colocated":
            self.engine.pause()

    def hand_devices_to_rollout(self) -> None:
        if self.is_main and self.cfg.rollout.mode == "colocated":
            self.engine.resume()

    def sync_weights(self, version: int) -> int:
        """Stream the policy's weights into the engine; returns the bytes sent."""
        sent = 0

        def buckets():
            nonlocal sent
            for bucket in self.policy.export_hf_buckets(self.cfg.rollout.sync_bucket_bytes):
                sent += sum(t.numel() * t.element_size() for _, t in bucket)
                yield bucket

        if self.is_main:
            self.engine.update_weights(buckets(), version=version)
        else:  # the export is collective over the model-parallel group
            for _ in buckets():
                pass
        return sent

    def evaluate(self, step: int) -> dict[str, float]:
        """avg@k / pass@k on the held-out set with the eval sampling settings."""
        result: dict[str, float] | None = None
        if self.is_main and self.eval_data is not None and len(self.eval_data):
            e = self.cfg.eval
            params = eval_sampling_params(self.cfg)
            prompts = list(self.eval_data)
            batch = self.engine.generate([p.prompt_ids for p in prompts], e.n_samples, params)
            groups = self._score(prompts, batch)
            summary = summarize(
                [(g.data_source, [c > 0 for c in g.correct]) for g in groups],
                extra_ks=EVAL_PASS_KS,
            )
            allrow = summary["all"]
            result = {"eval/accuracy": allrow[f"avg@{e.n_samples}"]}
            result.update({f"eval/{k}": v for k, v in allrow.items() if k.startswith("pass@")})
            path = Path(self.cfg.train.output_dir) / "eval" / f"step_{step:06d}.json"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(summary, indent=2, sort_keys=True) + "\n")
        return broadcast_object(result) or {}

    def report(self, step: int, metrics: Mapping[str, float], timer: PhaseTimer) -> None:
        """Record every step (history, metrics.jsonl, the exporter); print its line on the
        steps `train.log_every` picks (`progress.prints_step_line`)."""
        row = {**metrics, **timer.metrics(), "step": float(step)}
        self.history.append(row)
        if not self.is_main:
            return
        t = self.cfg.train
        if prints_step_line(step, t.steps, t.log_every, row):
            print(step_line(step, t.steps, row), flush=True)
        out = Path(self.cfg.train.output_dir)
        out.mkdir(parents=True, exist_ok=True)
        with open(out / "metrics.jsonl", "a") as f:
            f.write(json.dumps(row) + "\n")
        if self.exporter is not None:
            self.exporter.record_step(step, row)

    def close(self, delete_push_group: bool = True) -> None:
        """`delete_push_group` False keeps a pre-empted run's last pushed values visible
        while Slurm requeues it."""
        if self.exporter is not None:
            self.exporter.close(delete_push_group=delete_push_group)
        if self.scorer is not None:
            self.scorer.close()
        if self.engine is not None:
            self.engine.shutdown()


def _policy_config(cfg: Config) -> Any:
    """The policy's settings: its config sections whole, plus what it needs from the
    rest (seed, rollout temperature, whether the loss needs a reference, LR decay span)."""
    from archer_mcore.actor.policy_config import PolicyConfig

    a = cfg.algorithm
    t = cfg.train
    needs_ref = a.kl_coef > 0 or (a.token_rule == "archer" and a.reasoning_kl_coef > 0)
    return PolicyConfig(
        model=cfg.model,
        parallel=cfg.parallel,
        optimizer=cfg.optimizer,
        kernels=cfg.kernels,
        seed=t.seed,
        temperature=cfg.rollout.temperature,
        with_reference=needs_ref,
        lr_decay_steps=t.steps * t.ppo_epochs * (t.prompts_per_step // t.mini_batch_prompts),
    )


def build_engine(cfg: Config, hf_config: Mapping[str, Any], pad_id: int) -> Any:
    """The rollout engine: the in-process LocalEngine, or SGLang (disaggregated: the
    servers in rollout.sglang.server_urls / router_url; colocated: servers this rank
    launches), with every rollout / rollout.sglang setting applied
    (archer_mcore/rollout/sglang_config.py)."""
    if cfg.rollout.engine == "local":
        from archer_mcore.rollout.local_engine import LocalEngine

        return LocalEngine(dict(hf_config), seed=cfg.train.seed, pad_token_id=pad_id, num_threads=1)
    from archer_mcore.rollout.sglang_config import SGLangConfigError, build_sglang_engine

    try:
        return build_sglang_engine(cfg, hf_config, Path(cfg.train.output_dir) / "sglang",
                                   device="cuda" if torch.cuda.is_available() else "cpu")  # fmt: skip
    except SGLangConfigError as e:
        raise ConfigError(str(e)) from e


def build_components(cfg: Config) -> Components:
    """Everything the loop needs, in dependency order; fails early on bad config."""
    from archer_mcore.actor.policy import MegatronPolicy
    from archer_mcore.model.fp8 import detect_environment

    te_version, _ = detect_environment()
    check_context_parallel(cfg, te_version is not None, torch.cuda.is_available())
    out = Path(cfg.train.output_dir)
    cache = Path(cfg.warmstart.cache_dir)
    tokenizer = build_tokenizer(cfg, cache)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    train_files, eval_files = data_files(cfg, cache)
    train_data = PromptDataset.from_files(train_files, tokenizer, cfg.data.max_prompt_length)
    if len(train_data) == 0:
        raise ConfigError(f"data.train_files: no usable prompt in {train_files}")
    eval_data = (
        PromptDataset.from_files(eval_files, tokenizer, cfg.data.max_prompt_length)
        if eval_files
        else None
    )
    train_data = route_rewards(cfg, train_data, "data.train_files")
    eval_data = route_rewards(cfg, eval_data, "data.eval_files") if eval_data else None
    if cfg.warmstart.steps > 0 and cfg.warmstart.examples >= len(train_data):
        raise ConfigError(
            f"warmstart.examples ({cfg.warmstart.examples}) must be smaller than the "
            f"{len(train_data)} usable training prompts: RL samples only the prompts after "
            "the warm start's examples, and none would be left"
        )
    hf_config = hf_config_dict(cfg, tokenizer)
    if cfg.model.path:  # the inline model.arch was checked at load
        shape = shape_from_hf_config(hf_config)
        check_position_limit(
            cfg,
            shape.position_limit,
            f"{shape.position_limit_key} of {cfg.model.path}/config.json",
            "model.path",
            scaled=shape.rope_scaling is not None,
        )

    source: Any = cfg.model.path or hf_config
    if cfg.warmstart.steps > 0:
        from archer_mcore.train.warmstart import supervised_warmstart

        w = cfg.warmstart
        examples = warmstart_examples(train_data, tokenizer, w.examples, w.noise, cfg.train.seed)

        bar = ProgressBar("warm start", w.steps)  # drawn only on a terminal

        def progress(step: int, loss: float) -> None:
            bar.update()
            if step % 100 == 0 or step == w.steps:
                bar.close()
                print(f"warm start {step}/{w.steps} | sft loss {loss:.4f}", flush=True)

        source = str(
            supervised_warmstart(
                hf_config,
                examples,
                cache,
                w.steps,
                w.batch_size,
                w.lr,
                cfg.train.seed,
                pad_id,
                on_progress=progress,
            )
        )
    policy = MegatronPolicy.from_hf(source, _policy_config(cfg))
    engine = scorer = exporter = None
    if rank() == 0:
        from archer_mcore.rewards.scorer import RewardScorer

        engine = build_engine(cfg, hf_config, pad_id)
        scorer = RewardScorer.from_config(cfg.rewards)
        if cfg.metrics.enabled:
            from archer_mcore.metrics.exporter import MetricsExporter

            exporter = MetricsExporter.from_config(cfg.metrics, run=cfg.train.run_name)
            exporter.start()
            print(f"metrics: {exporter.url}", file=sys.stderr, flush=True)
            exporter.record_values(train_data.report.metrics())  # data/* counters
    # RL samples the prompts the warm start did not imitate (checked above), so that
    # its gains are not recall of demonstrations.
    offset = cfg.warmstart.examples if cfg.warmstart.steps > 0 else 0
    sampler = EpochSampler(len(train_data) - offset, seed=cfg.train.seed, shuffle=cfg.data.shuffle)
    return Components(
        cfg=cfg,
        tokenizer=tokenizer,
        prompts=PromptStream(train_data, sampler, offset),
        eval_data=eval_data,
        policy=policy,
        engine=engine,
        scorer=scorer,
        exporter=exporter,
        checkpoint_root=Path(cfg.checkpoint.dir) if cfg.checkpoint.dir else out / "checkpoints",
        pad_id=pad_id,
    )
