"""Checks of a loaded config that involve more than one field, and the ones the
trainer runs later with facts the loader does not have (context parallelism on this
machine, the model's position limit)."""

from __future__ import annotations

import importlib.util

from archer_mcore.config.errors import ConfigError, _at, clip
from archer_mcore.config.schema import Config


def _validate_rollout(cfg: Config, source: str) -> None:
    """Cross-field checks of the rollout / rollout.sglang sections."""
    r, s = cfg.rollout, cfg.rollout.sglang
    args = list(s.extra_server_args)
    for flag in ("--dp-size", "--dp", "--data-parallel-size"):
        if flag in args and args.index(flag) + 1 < len(args) and args[args.index(flag) + 1] != "1":
            raise ConfigError(
                f"{source}: rollout.sglang.extra_server_args asks for {flag} "
                f"{clip(args[args.index(flag) + 1])}: SGLang refuses distributed and tensor weight "
                "updates to a server with dp_size > 1 (assert dp_size == 1); raise "
                "rollout.sglang.num_servers instead"
            )
    if s.server_tp_sizes and len(s.server_tp_sizes) != len(s.server_urls):
        raise ConfigError(
            f"{source}: rollout.sglang.server_tp_sizes has {len(s.server_tp_sizes)} entries "
            f"for {len(s.server_urls)} server_urls"
        )
    if any(tp < 1 for tp in s.server_tp_sizes):
        raise ConfigError(f"{source}: rollout.sglang.server_tp_sizes must be >= 1")
    if r.engine == "sglang" and r.weight_sync == "tensor" and r.mode != "colocated":
        raise ConfigError(
            f"{source}: rollout.weight_sync = tensor passes shared-memory handles, so it needs "
            "rollout.mode = colocated (servers on the trainer's host)"
        )
    if r.engine == "sglang" and r.mode == "colocated" and (s.server_urls or s.router_url):
        raise ConfigError(
            f"{source}: rollout.mode = colocated launches its own servers and router; "
            "rollout.sglang.server_urls / router_url are for rollout.mode = disaggregated"
        )
    if r.async_steps and r.mode == "colocated":
        raise ConfigError(
            f"{source}: rollout.async_steps = {r.async_steps} overlaps generation with training, "
            "but rollout.mode = colocated shares the trainer's devices: the engine is paused "
            "while the policy trains, so there is nothing to overlap. Use rollout.mode = "
            "disaggregated (SGLang servers on their own nodes, or the local engine generating "
            "on a thread of its own with its own model copy), or rollout.async_steps = 0"
        )
    if r.async_steps and r.tis_cap is None:
        raise ConfigError(
            f"{source}: rollout.async_steps = {r.async_steps} trains on samples of the previous "
            "policy; set rollout.tis_cap (e.g. 2.0) so that truncated importance sampling "
            "corrects pi_old / pi_rollout (README, 'Async rollout')"
        )
    if s.router_url and not s.server_urls:
        raise ConfigError(
            f"{source}: rollout.sglang.router_url needs rollout.sglang.server_urls (weights "
            "are sent to each server, not through the router)"
        )


def _validate_colocated_sync(cfg: Config, source: str) -> None:
    """Colocated SGLang servers run on the trainer's own GPUs (server k on GPUs
    k*tp_size ...; archer_mcore/rollout/sglang_config.py), so a distributed weight
    sync over NCCL would put the trainer's rank 0 and server 0's TP rank 0, both on
    GPU 0, into one NCCL communicator, which NCCL refuses (duplicate GPU)."""
    r = cfg.rollout
    if (
        r.engine == "sglang"
        and r.mode == "colocated"
        and r.weight_sync in ("distributed", "nccl")
        and r.sglang.sync_backend == "nccl"
    ):
        raise ConfigError(
            f"{source}: rollout.weight_sync = {r.weight_sync} with rollout.mode = colocated "
            "(and rollout.sglang.sync_backend = nccl) would put the trainer's rank 0 and "
            "the first server's TP rank 0, which share GPU 0, into one NCCL communicator, "
            "and NCCL refuses two ranks on one GPU. Colocated servers are on the trainer's "
            "host: use rollout.weight_sync: tensor (CUDA IPC handles, no copy through the "
            "host) or rollout.weight_sync: disk; for a distributed sync use rollout.mode: "
            "disaggregated (servers on their own GPUs)"
        )


#: metrics.trackers entry -> (the module its library installs, the setup.py extra)
TRACKER_LIBRARIES = {
    "tensorboard": ("tensorboard", "tensorboard"),
    "wandb": ("wandb", "wandb"),
    "mlflow": ("mlflow", "mlflow"),
}


def _validate_trackers(cfg: Config, source: str) -> None:
    """metrics.trackers: no repeats, and each tracker's library importable (checked at
    load, before the tokenizer and the model load)."""
    m = cfg.metrics
    key = "metrics.trackers"
    repeated = sorted({t for t in m.trackers if m.trackers.count(t) > 1})
    if repeated:
        raise ConfigError(f"{_at(source, key)}: {key} lists {', '.join(repeated)} more than once")
    for tracker in m.trackers:
        module, extra = TRACKER_LIBRARIES[tracker]
        try:
            found = importlib.util.find_spec(module) is not None
        except (ImportError, ValueError):
            found = False
        if not found:
            raise ConfigError(
                f"{_at(source, key)}: {key} lists {tracker}, but its library ({module}) is "
                f"not installed: pip install 'archer-mcore[{extra}]'"
            )
    if {"wandb", "mlflow"} & set(m.trackers) and not m.tracker_project.strip():
        raise ConfigError(
            f"{_at(source, 'metrics.tracker_project')}: metrics.tracker_project must not be "
            "empty with the wandb or mlflow tracker (it names the project / experiment)"
        )


def validate_config(cfg: Config, source: str) -> None:
    """Checks that involve more than one field."""
    _validate_rollout(cfg, source)
    _validate_trackers(cfg, source)
    _validate_colocated_sync(cfg, source)
    t, a = cfg.train, cfg.algorithm
    if t.prompts_per_step % t.mini_batch_prompts:
        raise ConfigError(
            f"{source}: train.prompts_per_step ({t.prompts_per_step}) must be a multiple of "
            f"train.mini_batch_prompts ({t.mini_batch_prompts})"
        )
    if a.overlong_cache_length > a.overlong_max_length:
        raise ConfigError(
            f"{source}: algorithm.overlong_cache_length ({a.overlong_cache_length}) must not "
            f"exceed algorithm.overlong_max_length ({a.overlong_max_length})"
        )
    d = cfg.data
    if cfg.eval.every and d.train_files and not d.eval_files:
        raise ConfigError(
            f"{source}: eval.every = {cfg.eval.every} but data.eval_files is empty: with "
            "data.train_files given there is no held-out set; list one in data.eval_files "
            "or set eval.every: 0"
        )
    if cfg.optimizer.min_lr > cfg.optimizer.lr:
        raise ConfigError(f"{source}: optimizer.min_lr must not exceed optimizer.lr")
    syn = cfg.data.synthetic
    if syn.min_operands > syn.max_operands or syn.min_value > syn.max_value:
        raise ConfigError(
            f"{source}: data.synthetic: need min_operands <= max_operands and min_value <= max_value"
        )
    if not syn.operators or set(syn.operators) - set("+-*"):
        raise ConfigError(f"{source}: data.synthetic.operators must be a non-empty subset of '+-*'")
    if cfg.rollout.n_samples_per_prompt < 2:
        raise ConfigError(
            f"{source}: rollout.n_samples_per_prompt = {cfg.rollout.n_samples_per_prompt}: "
            "advantages are normalised within each prompt's group of responses (reward "
            "minus the group mean), so a group of one always has advantage 0 and no update "
            "ever happens; use 2 or more"
        )
    w = cfg.warmstart
    if w.steps > 0 and not cfg.data.train_files and w.examples >= cfg.data.synthetic_train_size:
        raise ConfigError(
            f"{source}: warmstart.examples ({w.examples}) must be smaller than "
            f"data.synthetic_train_size ({cfg.data.synthetic_train_size}): RL samples only "
            "the prompts after the warm start's examples, and none would be left"
        )
    # rewards.kinds: every entry imported and checked now (rewards/config_kinds.py)
    from archer_mcore.rewards.config_kinds import registry_from_config

    registry = registry_from_config(cfg.rewards, source)
    if cfg.data.default_reward_kind:
        kinds = sorted(registry.kinds)
        if cfg.data.default_reward_kind not in kinds:
            raise ConfigError(
                f"{_at(source, 'data.default_reward_kind')}: data.default_reward_kind must be "
                f"one of {', '.join(kinds)} (or empty), got {clip(cfg.data.default_reward_kind)}"
            )
    arch = cfg.model.arch
    if arch.num_attention_heads % arch.num_key_value_heads:
        raise ConfigError(
            f"{source}: model.arch.num_attention_heads must be a multiple of "
            "model.arch.num_key_value_heads"
        )
    _validate_moe(cfg, source)
    cp = cfg.parallel.context_parallel_size
    if cp > 1 and cfg.model.transformer_impl != "transformer_engine":
        raise ConfigError(
            f"{source}: parallel.context_parallel_size = {cp} needs "
            "model.transformer_impl: transformer_engine: megatron-core's context-parallel "
            "attention exists only in Transformer Engine layers (on GPUs)"
        )
    if not cfg.model.path:  # the inline model's positions are known now
        check_position_limit(
            cfg, arch.max_position_embeddings, "model.arch.max_position_embeddings", source
        )


def _validate_moe(cfg: Config, source: str) -> None:
    """The inline MoE architecture and expert parallelism (a `model.path` model's
    experts are checked when the model is built, model/families/qwen3_moe.py)."""
    arch = cfg.model.arch
    ep = cfg.parallel.expert_model_parallel_size
    if cfg.model.path:
        return
    if arch.family != "qwen3_moe":
        if ep > 1:
            raise ConfigError(
                f"{_at(source, 'parallel.expert_model_parallel_size')}: "
                f"parallel.expert_model_parallel_size = {ep} needs an MoE model; "
                f"model.arch.family is {arch.family!r} (use qwen3_moe, or 1)"
            )
        return
    if arch.num_experts_per_tok > arch.num_experts:
        raise ConfigError(
            f"{_at(source, 'model.arch.num_experts_per_tok')}: model.arch.num_experts_per_tok"
            f" = {arch.num_experts_per_tok} must be at most model.arch.num_experts = "
            f"{arch.num_experts}"
        )
    if arch.num_experts % ep:
        raise ConfigError(
            f"{_at(source, 'parallel.expert_model_parallel_size')}: "
            f"parallel.expert_model_parallel_size = {ep} must divide model.arch.num_experts"
            f" = {arch.num_experts} (each EP rank holds num_experts / EP experts)"
        )
    tp = cfg.parallel.tensor_model_parallel_size
    if tp > 1 and not cfg.parallel.sequence_parallel:
        raise ConfigError(
            f"{_at(source, 'parallel.sequence_parallel')}: parallel.sequence_parallel must be "
            f"true for an MoE model at parallel.tensor_model_parallel_size = {tp} "
            "(megatron-core's MoELayer refuses to train with TP > 1 without it)"
        )


def check_context_parallel(cfg: Config, te_importable: bool, cuda: bool) -> None:
    """Refuse parallel.context_parallel_size > 1 when building the trainer.

    megatron-core 0.16.1's context parallelism is Transformer Engine's ring attention
    (TEDotProductAttention with cp_group; the local spec's DotProductAttention,
    megatron/core/transformer/dot_product_attention.py, asserts context_parallel_size
    == 1), which needs CUDA; and this trainer does not split its micro-batches over
    CP ranks, which cannot be tested on CPU. The key is for `archer plan`."""
    cp = cfg.parallel.context_parallel_size
    if cp <= 1:
        return
    missing = [
        what
        for what, ok in (
            ("transformer_engine is not importable", te_importable),
            ("no CUDA device", cuda),
        )
        if not ok
    ]
    why = f" (here: {', '.join(missing)})" if missing else ""
    raise ConfigError(
        f"parallel.context_parallel_size = {cp}: context parallelism needs Transformer "
        f"Engine attention on GPUs{why}, and this trainer does not yet split micro-batches "
        "over CP ranks; `archer plan` models CP layouts. Set it to 1 to train."
    )


def check_position_limit(
    cfg: Config, limit: int, limit_key: str, source: str, scaled: bool = False
) -> None:
    """The longest sequence the run produces, data.max_prompt_length + rollout.max_new_tokens
    (and + eval.max_new_tokens), must fit the model's positions: `limit` tokens, named by
    `limit_key` (max_position_embeddings, or with YaRN rope scaling factor x
    original_max_position_embeddings, `scaled`). Raises ConfigError naming the keys."""
    prompt = cfg.data.max_prompt_length
    fix = (
        "raise rope_scaling.factor"
        if scaled
        else "extend the model's context with YaRN rope scaling (config.json rope_scaling: "
        "{rope_type: yarn, factor, original_max_position_embeddings})"
    )
    for key, new in (
        ("rollout.max_new_tokens", cfg.rollout.max_new_tokens),
        ("eval.max_new_tokens", cfg.eval.max_new_tokens),
    ):
        if prompt + new > limit:
            raise ConfigError(
                f"{source}: data.max_prompt_length ({prompt}) + {key} ({new}) = {prompt + new} "
                f"exceeds the model's positions, {limit_key} = {limit}: lower one of them, or "
                f"{fix}"
            )
