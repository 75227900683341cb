"""The RL loop's components, built from the config: data, policy, engine, rewards,
metrics, and the bundle the loop holds them in.

Rank layout: every rank holds the Megatron policy; the rollout engine, the reward
scorer and the metrics exporter live on global rank 0, which generates and scores each
batch and broadcasts it to the other ranks. Data preparation is in
`archer_mcore.data.prepare`, the rank helpers in `archer_mcore.parallel.ranks`.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from archer_mcore.actor.offload import TrainerOffload
from archer_mcore.actor.protocol import Policy
from archer_mcore.config import (
    Config,
    ConfigError,
    check_context_parallel,
    check_position_limit,
)
from archer_mcore.data.prepare import (
    PromptStream,
    build_tokenizer,
    load_datasets,
    warmstart_examples,
)
from archer_mcore.data.prompt_dataset import PromptDataset
from archer_mcore.data.sampler import EpochSampler
from archer_mcore.model.hf_config import model_hf_config, shape_from_hf_config
from archer_mcore.parallel.ranks import destroy_control_group, init_control_group, rank
from archer_mcore.rewards.registry import RewardRegistry
from archer_mcore.rollout.types import RolloutEngine
from archer_mcore.train.log import log as user_log
from archer_mcore.train.progress import PhaseTimer, ProgressBar, prints_step_line, step_line
from archer_mcore.train.protocols import (
    MetricsSink,
    NamedTensorBucket,
    RewardScorer,
    SamplingRngOwner,
    Tokenizer,
)
from archer_mcore.utils.safe_files import append_line


# ----------------------------------------------------------------------------- the bundle
@dataclass(kw_only=True)
class Components:
    """What one RL run holds: on every rank the policy and the prompt stream; on rank
    0 only (None elsewhere) the engine, the reward scorer and the metrics exporter."""

    cfg: Config
    tokenizer: Tokenizer
    prompts: PromptStream
    eval_data: PromptDataset | None
    policy: Policy
    engine: RolloutEngine | None
    scorer: RewardScorer | None
    exporter: MetricsSink | None
    checkpoint_root: Path
    pad_id: int
    engine_rng: SamplingRngOwner | None = None  # the engine, when its sampler is resumable
    # colocated SGLang with rollout.colocated_offload: every rank's optimizer state and
    # gradient buffers, on the host while the servers hold the GPUs (`build_offload`)
    offload: TrainerOffload | None = None
    history: list[dict[str, float]] = field(default_factory=list)
    _failures_reported: int = 0

    @property
    def is_main(self) -> bool:
        return rank() == 0

    def reward_failures(self) -> int:
        """Reward faults since the last call (rank 0's count)."""
        if not self.is_main:
            return 0
        assert self.scorer is not None
        total = self.scorer.counters().get("faults", 0)
        new, self._failures_reported = total - self._failures_reported, total
        return new

    def rollout_rng_state(self) -> Any:
        """The engine's running sampling RNG (rank 0; None where it has none), for
        checkpoints: a resumed run then samples what the uninterrupted one would."""
        return self.engine_rng.rng_state() if self.is_main and self.engine_rng else None

    def set_rollout_rng_state(self, state: Any) -> None:
        if self.is_main and self.engine_rng is not None and state is not None:
            self.engine_rng.set_rng_state(state)

    # -- devices and weights -----------------------------------------------------------
    def hand_devices_to_training(self) -> None:
        """Colocated mode: the engine stops generating while the policy trains (an
        engine that can release its memory does so on pause); with `offload`, every
        rank then waits for that release and brings its optimizer state and gradient
        buffers back to the device."""
        if self.is_main and self.cfg.rollout.mode == "colocated":
            assert self.engine is not None
            self.engine.pause()
        if self.offload is not None and self.offload.offloaded:
            _all_ranks_here()  # rank 0's servers have released their memory
            self.offload.reload()

    def hand_devices_to_rollout(self) -> None:
        """Colocated mode: the engine generates again (resuming its KV cache); with
        `offload`, every rank's training-only memory is freed first (normally done
        already at the start of `sync_weights`)."""
        self._free_training_memory()
        if self.is_main and self.cfg.rollout.mode == "colocated":
            assert self.engine is not None
            self.engine.resume()

    def _free_training_memory(self) -> None:
        """With `offload`: optimizer state and gradient buffers to host and
        `torch.cuda.empty_cache()` on every rank, then a barrier, before rank 0's
        servers take any memory back (their weights in the sync, the KV cache on
        resume). No-op when already offloaded or without `offload`."""
        if self.offload is not None and not self.offload.offloaded:
            self.offload.offload()
            _all_ranks_here()

    def sync_weights(self, version: int) -> int:
        """Stream the policy's weights into the engine; returns the bytes sent. With
        `offload`, the training-only memory is freed first: the export reads only the
        model parameters, and colocated servers resume their weights' memory here."""
        self._free_training_memory()
        sent = 0

        def buckets() -> Iterator[NamedTensorBucket]:
            nonlocal sent
            for bucket in self.policy.export_hf_buckets(self.cfg.rollout.sync_bucket_bytes):
                sent += sum(t.numel() * t.element_size() for _, t in bucket)
                yield bucket

        if self.is_main:
            assert self.engine is not None
            self.engine.update_weights(buckets(), version=version)
        else:  # the export is collective over the model-parallel group
            for _ in buckets():
                pass
        return sent

    # -- metrics and shutdown ----------------------------------------------------------
    def report(self, step: int, metrics: Mapping[str, float], timer: PhaseTimer) -> None:
        """Record every step (history, metrics.jsonl, the exporter); print its line on the
        steps `train.log_every` picks (`progress.prints_step_line`)."""
        row = {**metrics, **timer.metrics(), "step": float(step)}
        self.history.append(row)
        if not self.is_main:
            return
        t = self.cfg.train
        if prints_step_line(step, t.steps, t.log_every, row):
            user_log.info(step_line(step, t.steps, row))
        out = Path(self.cfg.train.output_dir)
        out.mkdir(parents=True, exist_ok=True)
        append_line(out / "metrics.jsonl", json.dumps(row) + "\n")  # never through a link
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
        destroy_control_group()


def _all_ranks_here() -> None:
    """A barrier over every rank (the host-side control group), when distributed."""
    from archer_mcore.parallel.ranks import control_group, is_distributed

    if is_distributed():
        torch.distributed.barrier(group=control_group())


def build_offload(cfg: Config, policy: Any) -> TrainerOffload | None:
    """The trainer's offload (actor/offload.py) for colocated SGLang servers, which
    share the trainer's GPUs and size their KV cache from the memory free when they
    start, with `rollout.colocated_offload` on; None otherwise (the local engine
    releases nothing, disaggregated servers have GPUs of their own). `policy`: a
    MegatronPolicy (its DDP `model` and megatron `optimizer`). Gradients are dropped,
    not copied: they are dead between optimizer steps."""
    r = cfg.rollout
    if not (r.colocated_offload and r.engine == "sglang" and r.mode == "colocated"):
        return None
    return TrainerOffload(model=policy.model, optimizer=policy.optimizer)


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


def _policy_config(cfg: Config) -> Any:
    """The policy's settings: its config sections whole, plus what it needs from the
    rest (seed, rollout temperature, whether the loss needs a reference, LR decay span)."""
    from archer_mcore.actor.policy_config import PolicyConfig
    from archer_mcore.algo.token_rules import token_rule_for

    a = cfg.algorithm
    t = cfg.train
    needs_ref = token_rule_for(a).needs_reference()  # the rule's KL coefficients
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


def build_engine(cfg: Config, hf_config: Mapping[str, Any], pad_id: int) -> RolloutEngine:
    """The rollout engine: the in-process LocalEngine, or SGLang (disaggregated: the
    servers in rollout.sglang.server_urls / router_url; colocated: servers this rank
    launches), with every rollout / rollout.sglang setting applied
    (archer_mcore/rollout/sglang_config.py)."""
    if cfg.rollout.engine == "local":
        from archer_mcore.rollout.local_engine import LocalEngine

        return LocalEngine(dict(hf_config), seed=cfg.train.seed, pad_token_id=pad_id, num_threads=1)
    from archer_mcore.rollout.sglang_config import SGLangConfigError, build_sglang_engine

    try:
        return build_sglang_engine(
            cfg,
            hf_config,
            Path(cfg.train.output_dir) / "sglang",
            device="cuda" if torch.cuda.is_available() else "cpu",
        )
    except SGLangConfigError as e:
        raise ConfigError(str(e)) from e


def _check_model_path(cfg: Config, hf_config: Mapping[str, Any]) -> None:
    """`model.path`'s position limit holds the prompt and the response (the inline
    `model.arch` was checked at load)."""
    if cfg.model.path:
        shape = shape_from_hf_config(hf_config)
        check_position_limit(
            cfg,
            shape.position_limit,
            f"{shape.position_limit_key} of {cfg.model.path}/config.json",
            "model.path",
            scaled=shape.rope_scaling is not None,
        )


def _warm_start(
    cfg: Config,
    train_data: PromptDataset,
    tokenizer: Tokenizer,
    *,
    hf_config: dict[str, Any],
    cache: Path,
    pad_id: int,
) -> str:
    """The supervised warm start's model directory (trained, or reused from `cache`)."""
    from archer_mcore.train.warmstart import supervised_warmstart

    w = cfg.warmstart
    examples = warmstart_examples(
        train_data, tokenizer, count=w.examples, noise=w.noise, seed=cfg.train.seed
    )

    bar = ProgressBar("warm start", w.steps)  # drawn only on a terminal

    def progress(step: int, loss: float) -> None:
        bar.update()
        if step % 100 == 0 or step == w.steps:
            bar.close()
            user_log.info(f"warm start {step}/{w.steps} | sft loss {loss:.4f}")

    return str(
        supervised_warmstart(
            hf_config,
            examples,
            cache,
            steps=w.steps,
            batch_size=w.batch_size,
            lr=w.lr,
            seed=cfg.train.seed,
            pad_id=pad_id,
            on_progress=progress,
        )
    )


def _rank0_services(
    cfg: Config,
    hf_config: Mapping[str, Any],
    pad_id: int,
    train_data: PromptDataset,
    rewards: RewardRegistry,
) -> tuple[RolloutEngine, RewardScorer, MetricsSink | None]:
    """Rank 0's engine, reward scorer (over `rewards`, the run's reward registry) and
    metrics sink: the started exporter (when `metrics.enabled`), wrapped with the
    `metrics.trackers` when any."""
    from archer_mcore.rewards.scorer import RewardScorer as Scorer

    engine = build_engine(cfg, hf_config, pad_id)
    scorer = Scorer.from_config(cfg.rewards, registry=rewards)
    exporter = None
    if cfg.metrics.enabled:
        from archer_mcore.metrics.exporter import MetricsExporter

        exporter = MetricsExporter.from_config(cfg.metrics, run=cfg.train.run_name)
        exporter.start()
        user_log.info(f"metrics: {exporter.url}", stderr=True)
        exporter.record_values(train_data.report.metrics())  # data/* counters
    from archer_mcore.metrics.trackers import with_trackers  # metrics.trackers, rank 0

    return engine, scorer, with_trackers(cfg, exporter)


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
    # the reward registry, built once: it routes the data and the scorer uses it
    from archer_mcore.rewards.config_kinds import registry_from_config

    rewards = registry_from_config(cfg.rewards)
    train_data, eval_data = load_datasets(cfg, tokenizer, cache, registry=rewards)
    if cfg.warmstart.steps > 0 and cfg.warmstart.examples >= len(train_data):
        raise ConfigError(
            f"warmstart.examples ({cfg.warmstart.examples}) must be smaller than the "
            f"{len(train_data)} usable training prompts: RL samples only the prompts after "
            "the warm start's examples, and none would be left"
        )
    hf_config = hf_config_dict(cfg, tokenizer)
    _check_model_path(cfg, hf_config)

    source: Any = cfg.model.path or hf_config
    if cfg.warmstart.steps > 0:
        source = _warm_start(
            cfg, train_data, tokenizer, hf_config=hf_config, cache=cache, pad_id=pad_id
        )
    policy = MegatronPolicy.from_hf(source, _policy_config(cfg))  # initialises torch.distributed
    # how long the ranks wait for rank 0's rollout: its group, made while all are here
    init_control_group(cfg.parallel.rollout_wait_timeout_s)
    engine = scorer = exporter = None
    if rank() == 0:
        engine, scorer, exporter = _rank0_services(
            cfg, hf_config, pad_id, train_data=train_data, rewards=rewards
        )
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
        # The in-process engine's sampler is restorable; an SGLang server's is not.
        engine_rng=engine if engine is not None and cfg.rollout.engine == "local" else None,  # type: ignore[arg-type]
        offload=build_offload(cfg, policy),
    )
