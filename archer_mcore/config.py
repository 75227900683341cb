"""One typed config tree, loaded from YAML.

Every section is a dataclass with defaults for every field. Loading checks each key and
value against the dataclass: an unknown key, a wrong type or an out-of-range value
raises `ConfigError` naming the file and the dotted key. `algorithm.name` selects a
preset (the papers' recipes, see `ALGORITHM_PRESETS`) whose fields the YAML may then
override one by one.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml


class ConfigError(ValueError):
    """A bad config: the message names the file and the dotted key."""


def _f(default: Any = dataclasses.MISSING, *, factory: Any = None, **checks: Any) -> Any:
    """A dataclass field with range checks: gt, ge, lt, le (numbers), nonempty (str)."""
    if factory is not None:
        return field(default_factory=factory, metadata=checks)
    return field(default=default, metadata=checks)


# --------------------------------------------------------------------------- sections
@dataclass
class ArchConfig:
    """Architecture of an inline model (used when `model.path` is empty), HF names."""

    family: Literal["qwen2", "qwen3"] = "qwen3"
    vocab_size: int = _f(64, gt=0)
    hidden_size: int = _f(64, gt=0)
    intermediate_size: int = _f(192, gt=0)
    num_hidden_layers: int = _f(2, gt=0)
    num_attention_heads: int = _f(4, gt=0)
    num_key_value_heads: int = _f(2, gt=0)
    head_dim: int = _f(16, gt=0)
    rope_theta: float = _f(10000.0, gt=0)
    rms_norm_eps: float = _f(1e-6, gt=0)
    max_position_embeddings: int = _f(2048, gt=0)  # >= data.max_prompt_length + max_new_tokens
    tie_word_embeddings: bool = True


@dataclass
class ModelConfig:
    path: str = ""  # HF model dir (config.json [+ safetensors]); empty: `arch`, random init
    tokenizer: str = ""  # tokenizer dir; empty: `path`, or the synthetic task's tokenizer
    arch: ArchConfig = field(default_factory=ArchConfig)
    transformer_impl: Literal["local", "transformer_engine"] = "local"
    params_dtype: Literal["auto", "float32", "bfloat16"] = "auto"  # auto: bf16 on GPU, fp32 on CPU
    fp8: Literal["none", "delayed", "tensorwise", "blockwise"] = "none"
    recompute: Literal["none", "selective", "full"] = "none"


@dataclass
class ParallelConfig:
    tensor_model_parallel_size: int = _f(1, ge=1)
    pipeline_model_parallel_size: int = _f(1, ge=1)
    sequence_parallel: bool = False
    use_distributed_optimizer: bool = True
    micro_batch_tokens: int = _f(8192, gt=0)  # token budget of one micro-batch
    # CP: each micro-batch's tokens split over this many GPUs (ring attention). Needs
    # Transformer Engine on GPUs; `archer plan` models it, the trainer refuses CP > 1.
    context_parallel_size: int = _f(1, ge=1)
    # pack sequences into micro-batches (THD / block-diagonal mask) instead of padding rows
    pack_sequences: bool = True


@dataclass
class SGLangConfig:
    """The SGLang rollout engine (rollout.engine = sglang); docs/sglang.md.

    Disaggregated mode: the servers run elsewhere (the Slurm script starts them and sets
    server_urls, router_url and master_address). Colocated mode: the trainer launches
    num_servers servers (tp_size GPUs each) on its own node with server_command.
    """

    num_servers: int = _f(1, ge=1)  # colocated: servers the trainer launches
    tp_size: int = _f(1, ge=1)  # colocated: TP size of each launched server
    mem_fraction_static: float = _f(0.8, gt=0.0, lt=1.0)  # --mem-fraction-static
    dtype: Literal["bfloat16", "float16", "float32", "auto"] = "bfloat16"  # --dtype
    host: str = "127.0.0.1"  # colocated: where launched servers listen
    base_port: int = _f(30000, gt=0, lt=65536)
    router_port: int = _f(30100, gt=0, lt=65536)
    router_policy: Literal["cache_aware", "round_robin", "random", "power_of_two"] = "cache_aware"
    request_timeout_s: float = _f(1800.0, gt=0)
    health_timeout_s: float = _f(900.0, gt=0)
    max_concurrency: int = _f(512, ge=1)
    max_retries: int = _f(3, ge=0)
    server_urls: list[str] = _f(factory=list)  # disaggregated: servers already running
    # disaggregated: the sglang-router in front of server_urls ("": no router, the
    # engine spreads requests over server_urls itself)
    router_url: str = ""
    # TP size of each server in server_urls (its ranks in the weight-update group);
    # empty: read from each server's /server_info
    server_tp_sizes: list[int] = _f(factory=list)
    # the address the servers reach the trainer's rank 0 at for the weight-update group;
    # "": $MASTER_ADDR (the Slurm scripts set it to the first training node's address),
    # else this host's name resolved; never a loopback address when servers are remote
    master_address: str = ""
    sync_backend: Literal["nccl", "gloo"] = "nccl"  # weight-update group backend
    sync_timeout_s: float = _f(600.0, gt=0)  # group init / one bucket, both sides
    # colocated: the server and router programs (default: this python's -m modules)
    server_command: list[str] = _f(factory=list)
    router_command: list[str] = _f(factory=list)
    extra_server_args: list[str] = _f(factory=list)  # appended to every launched server


@dataclass
class RolloutConfig:
    engine: Literal["local", "sglang"] = "local"
    mode: Literal["colocated", "disaggregated"] = "colocated"
    n_samples_per_prompt: int = _f(16, ge=1)
    temperature: float = _f(1.0, gt=0)
    top_p: float = _f(1.0, gt=0, le=1.0)
    top_k: int = _f(-1, ge=-1)  # -1: off
    max_new_tokens: int = _f(1024, gt=0)
    stop_token_ids: list[int] = _f(factory=list)
    # distributed: broadcast over a process group with every server TP worker ("nccl" is
    # the same, the older spelling); tensor: colocated servers, same host, shared memory;
    # disk: an HF checkpoint in <output_dir>/weight_sync + /update_weights_from_disk
    weight_sync: Literal["distributed", "nccl", "tensor", "disk"] = "distributed"
    sync_bucket_bytes: int = _f(512 * 1024 * 1024, gt=0)
    # FP8 rollout: servers start from a block-wise FP8 export and every sync sends e4m3
    # weights plus fp32 `_scale_inv` blocks (rollout/fp8_export.py)
    fp8: bool = False
    tis_cap: float | None = _f(None, gt=0)  # truncated importance sampling cap; None: off
    # 0: generate each step's batch, then train on it; 1: generate step k+1's batch on a
    # background thread while step k trains (one version stale; train/async_rollout.py)
    async_steps: int = _f(0, ge=0, le=1)
    sglang: SGLangConfig = field(default_factory=SGLangConfig)


@dataclass
class AlgorithmConfig:
    """The RL objective. Clip/KL fields without a `reasoning_` prefix apply to all tokens,
    or to knowledge tokens when `token_rule` is archer."""

    name: Literal["grpo", "dapo", "archer", "archer_code", "archer_math", "forking"] = "grpo"
    norm_adv_by_std: bool = True
    token_rule: Literal["none", "archer", "forking"] = "none"
    clip_low: float = _f(0.2, ge=0.0, lt=1.0)
    clip_high: float = _f(0.2, ge=0.0)
    reasoning_clip_low: float = _f(0.2, ge=0.0, lt=1.0)
    reasoning_clip_high: float = _f(0.2, ge=0.0)
    clip_ratio_c: float | None = _f(3.0, gt=1.0)
    kl_coef: float = _f(0.0, ge=0.0)
    reasoning_kl_coef: float = _f(0.0, ge=0.0)
    kl_estimator: Literal["k1", "k2", "k3"] = "k3"
    entropy_coef: float = _f(0.0, ge=0.0)
    agg_mode: Literal["token-mean", "seq-mean-token-mean", "seq-mean-token-sum"] = "token-mean"
    archer_quantile: float = _f(0.8, gt=0.0, lt=1.0)
    forking_rho: float = _f(0.2, gt=0.0, le=1.0)
    forking_scope: Literal["micro_batch", "mini_batch"] = "micro_batch"
    forking_normalizer: Literal["selected", "all"] = "selected"
    reward_correct: float = 1.0
    reward_incorrect: float = 0.0
    overlong_shaping: bool = False
    overlong_max_length: int = _f(20480, gt=0)
    overlong_cache_length: int = _f(4096, gt=0)
    group_filter: Literal["none", "drop", "refill"] = "none"
    max_generation_batches: int = _f(10, ge=1)


_DAPO: dict[str, Any] = {
    "clip_low": 0.2,
    "clip_high": 0.28,
    "clip_ratio_c": 10.0,
    "kl_coef": 0.0,
    "agg_mode": "token-mean",
    "reward_correct": 1.0,
    "reward_incorrect": -1.0,
    "overlong_shaping": True,
    "overlong_max_length": 20480,
    "overlong_cache_length": 4096,
    "group_filter": "refill",
    "max_generation_batches": 10,
}
_ARCHER_CODE: dict[str, Any] = {
    "token_rule": "archer",
    "clip_low": 0.2,
    "clip_high": 0.2,
    "reasoning_clip_low": 0.5,
    "reasoning_clip_high": 0.5,
    "clip_ratio_c": 10.0,
    "kl_coef": 0.001,
    "reasoning_kl_coef": 0.0,
    "kl_estimator": "k3",
    "agg_mode": "seq-mean-token-mean",
    "archer_quantile": 0.8,
    "group_filter": "drop",
}
#: The papers' recipes (DESIGN.md); a YAML's `algorithm:` keys override them.
ALGORITHM_PRESETS: dict[str, dict[str, Any]] = {
    "grpo": {},
    "dapo": _DAPO,
    "archer_code": _ARCHER_CODE,
    "archer": _ARCHER_CODE,  # the code recipe; `archer_math` widens the reasoning clip
    "archer_math": {**_ARCHER_CODE, "reasoning_clip_low": 0.4, "reasoning_clip_high": 0.4},
    "forking": {
        **_DAPO,
        "token_rule": "forking",
        "forking_rho": 0.2,
        "forking_scope": "micro_batch",
        "forking_normalizer": "selected",
    },
}


@dataclass
class OptimizerConfig:
    lr: float = _f(1e-6, gt=0)
    min_lr: float = _f(0.0, ge=0)
    lr_schedule: Literal["constant", "cosine", "linear"] = "constant"
    lr_warmup_steps: int = _f(0, ge=0)
    weight_decay: float = _f(0.01, ge=0)
    adam_beta1: float = _f(0.9, ge=0, lt=1)
    adam_beta2: float = _f(0.999, ge=0, lt=1)
    adam_eps: float = _f(1e-8, gt=0)
    clip_grad: float = _f(1.0, ge=0)  # 0: off


@dataclass
class SyntheticTaskConfig:
    """The synthetic arithmetic task used when `data.train_files` is empty."""

    min_operands: int = _f(2, ge=2)
    max_operands: int = _f(3, ge=2)
    min_value: int = _f(0, ge=0)
    max_value: int = _f(9, ge=0)
    operators: str = "+-*"


@dataclass
class DataConfig:
    train_files: list[str] = _f(factory=list)  # JSONL/Parquet; empty: the synthetic task
    eval_files: list[str] = _f(factory=list)
    max_prompt_length: int = _f(1024, gt=0)
    shuffle: bool = True
    synthetic_train_size: int = _f(4096, gt=0)
    synthetic_eval_size: int = _f(256, gt=0)
    synthetic: SyntheticTaskConfig = field(default_factory=SyntheticTaskConfig)
    # The reward kind ("math", "code") of rows whose data_source maps to none and that
    # name none (reward_model.style / ability); empty: such rows are a config error.
    default_reward_kind: str = ""


@dataclass
class RewardsConfig:
    math_timeout_s: float = _f(5.0, gt=0)
    code_timeout_s: float = _f(10.0, gt=0)
    code_memory_mb: int = _f(1024, gt=0)
    num_workers: int = _f(4, ge=1)
    allow_unsandboxed_code: bool = False
    # numeric references: the answer must be a simplified number, not "0 - 9 - 0"
    math_strict_answer_form: bool = True


@dataclass
class TrainConfig:
    run_name: str = "archer"
    output_dir: str = "runs/archer"
    seed: int = 1234
    steps: int = _f(100, ge=0)
    prompts_per_step: int = _f(64, ge=1)
    mini_batch_prompts: int = _f(32, ge=1)
    ppo_epochs: int = _f(1, ge=1)
    max_nonfinite_in_a_row: int = _f(3, ge=1)
    torch_threads: int = _f(0, ge=0)  # intra-op CPU threads per process; 0: torch's default
    log_every: int = _f(1, ge=1)


@dataclass
class WarmstartConfig:
    """A short supervised phase before RL (the CPU demo), cached after the first run.

    Demonstrations are the synthetic task's worked solutions; a share `noise` of them
    stops after the worked steps without the final \\boxed{} answer the verifier reads, so
    the warm-started policy can solve the task but often fails to state its answer: the
    regime where RL with verifiable rewards helps. RL then samples only the prompts
    after the first `examples`, which the warm start never saw.
    """

    steps: int = _f(0, ge=0)  # 0: off (start from model.path or random weights)
    batch_size: int = _f(64, ge=1)
    lr: float = _f(3e-3, gt=0)
    noise: float = _f(0.0, ge=0.0, le=1.0)
    examples: int = _f(4096, ge=1)
    cache_dir: str = ".cache/archer/warmstart"


@dataclass
class EvalConfig:
    every: int = _f(0, ge=0)  # 0: off
    n_samples: int = _f(16, ge=1)  # k of avg@k / pass@k
    temperature: float = _f(0.6, ge=0)
    top_p: float = _f(0.95, gt=0, le=1)
    max_new_tokens: int = _f(1024, gt=0)


@dataclass
class CheckpointConfig:
    dir: str = ""  # empty: <train.output_dir>/checkpoints
    save_every: int = _f(50, ge=0)  # 0: only at the end and on signals
    keep_last: int = _f(3, ge=1)


@dataclass
class MetricsConfig:
    enabled: bool = True
    host: str = "127.0.0.1"
    port: int = _f(9400, ge=0, lt=65536)  # 0: any free port
    pushgateway: str = ""  # e.g. http://127.0.0.1:9091; empty: no push
    job: str = "archer"


@dataclass
class SlurmConfig:
    partition: str = ""
    account: str = ""
    nodes: int = _f(1, ge=1)
    gpus_per_node: int = _f(8, ge=0)
    gpu_type: Literal["h800", "h100", "h200", "cpu"] = "h800"
    rollout_nodes: int = _f(0, ge=0)  # disaggregated: nodes that run SGLang servers
    time: str = "24:00:00"
    container_image: str = ""
    extra_sbatch: list[str] = _f(factory=list)


@dataclass
class KernelsConfig:
    mode: Literal["auto", "triton", "torch"] = "auto"  # auto: Triton on CUDA, torch elsewhere
    fused_lm_head: bool = False


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    algorithm: AlgorithmConfig = field(default_factory=AlgorithmConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    data: DataConfig = field(default_factory=DataConfig)
    rewards: RewardsConfig = field(default_factory=RewardsConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    warmstart: WarmstartConfig = field(default_factory=WarmstartConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    slurm: SlurmConfig = field(default_factory=SlurmConfig)
    kernels: KernelsConfig = field(default_factory=KernelsConfig)


# --------------------------------------------------------------------------- loading
def _describe(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_describe(a) for a in typing.get_args(tp))
    if origin is list:
        return f"a list of {_describe(typing.get_args(tp)[0])}"
    if tp is type(None):
        return "null"
    return getattr(tp, "__name__", str(tp))


_YAML11_FLOAT = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+")


class _Origin(str):
    """A config file's name that also knows which dotted keys `-o` overrides set, so
    that an error in an overridden value blames the override, not the file."""

    overrides: dict[str, str]

    def __new__(cls, path: str, overrides: dict[str, str]) -> _Origin:
        obj = super().__new__(cls, path)
        obj.overrides = overrides
        return obj


def _at(source: str, key: str) -> str:
    """Where the value of dotted `key` came from: "override KEY=VALUE" or the file."""
    if isinstance(source, _Origin):
        parts = key.replace("[", ".[").split(".")
        for i in range(len(parts), 0, -1):
            prefix = ".".join(parts[:i]).replace(".[", "[")
            if prefix in source.overrides:
                return f"override {source.overrides[prefix]!r}"
    return str(source)


def _coerce(value: Any, tp: Any, key: str, source: str) -> Any:
    """Check `value` against annotation `tp`; return it (ints widen to float)."""
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{_at(source, key)}: {key} must be a mapping, got {value!r}")
        return _build(tp, value, key + ".", source)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        if float in args and isinstance(value, str) and _YAML11_FLOAT.fullmatch(value.strip()):
            value = float(value)
        if float in args and isinstance(value, float) and not math.isfinite(value):
            return _coerce(value, float, key, source)  # raises: must be a finite number
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, key, source)
            except ConfigError:
                continue
        raise ConfigError(f"{_at(source, key)}: {key} must be {_describe(tp)}, got {value!r}")
    if origin is Literal:
        if value not in typing.get_args(tp):
            raise ConfigError(f"{_at(source, key)}: {key} must be {_describe(tp)}, got {value!r}")
        return value
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{_at(source, key)}: {key} must be {_describe(tp)}, got {value!r}")
        (item,) = typing.get_args(tp)
        return [_coerce(v, item, f"{key}[{i}]", source) for i, v in enumerate(value)]
    if tp is float and isinstance(value, str) and _YAML11_FLOAT.fullmatch(value.strip()):
        value = float(value)  # YAML 1.1 reads "1e-6" (no dot) as a string
    ok = {
        bool: isinstance(value, bool),
        int: isinstance(value, int) and not isinstance(value, bool),
        float: isinstance(value, (int, float)) and not isinstance(value, bool),
        str: isinstance(value, str),
    }.get(tp)
    if ok is None:
        raise ConfigError(f"{_at(source, key)}: {key} has an unsupported type {tp!r}")
    if not ok:
        raise ConfigError(f"{_at(source, key)}: {key} must be {_describe(tp)}, got {value!r}")
    if tp is float and not math.isfinite(value):
        # YAML's .inf / .nan (or 1e999): a learning rate of inf makes every weight NaN.
        raise ConfigError(f"{_at(source, key)}: {key} must be a finite number, got {value!r}")
    return float(value) if tp is float else value


def _check_range(value: Any, meta: typing.Mapping[str, Any], key: str, source: str) -> None:
    if value is None or isinstance(value, (bool, str, list)):
        return
    bounds = {
        "gt": (lambda a, b: a > b, ">"),
        "ge": (lambda a, b: a >= b, ">="),
        "lt": (lambda a, b: a < b, "<"),
        "le": (lambda a, b: a <= b, "<="),
    }
    for name, (ok, _) in bounds.items():
        if name in meta and not ok(value, meta[name]):
            lo = [f"{bounds[n][1]} {meta[n]}" for n in ("gt", "ge", "lt", "le") if n in meta]
            raise ConfigError(
                f"{_at(source, key)}: {key} = {value!r} is out of range: must be {' and '.join(lo)}"
            )


def _build(cls: type, raw: dict[str, Any], prefix: str, source: str) -> Any:
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    if cls is AlgorithmConfig:
        name = raw.get("name", AlgorithmConfig.name)
        if name not in ALGORITHM_PRESETS:
            raise ConfigError(
                f"{_at(source, prefix + 'name')}: {prefix}name must be one of {', '.join(ALGORITHM_PRESETS)}, got {name!r}"
            )
        raw = {**ALGORITHM_PRESETS[name], **raw}
    kwargs = {}
    for key, value in raw.items():
        dotted = prefix + str(key)
        if key not in fields:
            near = difflib.get_close_matches(str(key), list(fields), n=1)
            hint = f" (did you mean {prefix}{near[0]}?)" if near else ""
            raise ConfigError(f"{_at(source, dotted)}: unknown key {dotted}{hint}")
        value = _coerce(value, hints[key], dotted, source)
        _check_range(value, fields[key].metadata, dotted, source)
        kwargs[key] = value
    return cls(**kwargs)


def _validate_rollout(cfg: Config, source: str) -> None:
    """Cross-field checks of the rollout / rollout.sglang sections."""
    r, s = cfg.rollout, cfg.rollout.sglang
    args = list(s.extra_server_args)
    for flag in ("--dp-size", "--dp", "--data-parallel-size"):
        if flag in args and args.index(flag) + 1 < len(args) and args[args.index(flag) + 1] != "1":
            raise ConfigError(
                f"{source}: rollout.sglang.extra_server_args asks for {flag} "
                f"{args[args.index(flag) + 1]}: SGLang refuses distributed and tensor weight "
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


def _validate(cfg: Config, source: str) -> None:
    """Checks that involve more than one field."""
    _validate_rollout(cfg, source)
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
    if cfg.data.default_reward_kind:
        from archer_mcore.rewards.registry import default_registry

        kinds = sorted(default_registry().kinds)
        if cfg.data.default_reward_kind not in kinds:
            raise ConfigError(
                f"{_at(source, 'data.default_reward_kind')}: data.default_reward_kind must be "
                f"one of {', '.join(kinds)} (or empty), got {cfg.data.default_reward_kind!r}"
            )
    arch = cfg.model.arch
    if arch.num_attention_heads % arch.num_key_value_heads:
        raise ConfigError(
            f"{source}: model.arch.num_attention_heads must be a multiple of "
            "model.arch.num_key_value_heads"
        )
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


def set_dotted(raw: dict[str, Any], dotted: str, value: Any) -> None:
    """Set raw["a"]["b"]["c"] = value for dotted = "a.b.c", creating mappings."""
    node = raw
    parts = dotted.split(".")
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"override {dotted}: {part} is not a section")
        node = child
    node[parts[-1]] = value


def apply_overrides(raw: dict[str, Any], overrides: typing.Iterable[str]) -> dict[str, Any]:
    """Apply `key.path=value` strings (values parsed as YAML) to a raw config mapping."""
    for item in overrides:
        key, sep, text = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"override {item!r} is not of the form key.path=value")
        try:
            value = yaml.load(text, Loader=_UniqueKeyLoader) if text.strip() else ""
        except ConfigError as exc:
            raise ConfigError(f"override {item!r}: {exc}") from None
        except yaml.YAMLError as exc:
            raise ConfigError(
                f"override {item!r}: the value is not valid YAML: {_one_line(exc)}"
            ) from None
        set_dotted(raw, key.strip(), value)
    return raw


def _one_line(exc: yaml.YAMLError) -> str:
    return " ".join(str(exc).split())


class _UniqueKeyLoader(yaml.SafeLoader):
    """yaml.SafeLoader that refuses a mapping with the same key twice (plain PyYAML
    keeps the last one silently)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            line = key_node.start_mark.line + 1
            try:
                first = seen.setdefault(key, line)
            except TypeError:  # an unhashable key: let PyYAML report it
                continue
            if first != line:
                raise ConfigError(
                    f"duplicate key {key!r} at line {line} (first set at line {first})"
                )
        return super().construct_mapping(node, deep=deep)


def config_from_dict(raw: dict[str, Any] | None, source: str = "<config>") -> Config:
    """Build and validate a `Config` from a plain mapping."""
    raw = raw or {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: the top level must be a mapping, got {type(raw).__name__}")
    cfg = _build(Config, raw, "", source)
    _validate(cfg, source)
    return cfg


def load_config(path: str | Path, overrides: typing.Iterable[str] = ()) -> Config:
    """Load a YAML config file, apply overrides, validate. Errors name file and key."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read config: {exc.strerror or exc}") from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(
            f"{path}: not UTF-8 text (byte 0x{data[exc.start]:02x} at offset {exc.start})"
        ) from None
    try:
        raw = yaml.load(text, Loader=_UniqueKeyLoader) or {}
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: invalid YAML: {_one_line(exc)}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: the top level must be a mapping, got {type(raw).__name__}")
    overrides = list(overrides)
    origins = {}
    for item in overrides:
        key, _, _ = item.partition("=")
        origins[key.strip()] = item
    raw = apply_overrides(raw, overrides)
    return config_from_dict(raw, _Origin(str(path), origins))


def to_dict(cfg: Config) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def dump_yaml(cfg: Config) -> str:
    """The fully resolved config as YAML (loads back to an equal config)."""
    return yaml.safe_dump(to_dict(cfg), sort_keys=False, default_flow_style=False)
