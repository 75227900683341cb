"""The config tree: one dataclass per section, every field with a default.

Range checks (gt, ge, lt, le) ride on each field's metadata (`_f`); `config.load`
enforces them. The `algorithm` section, its token rules' settings and the papers'
recipes that `algorithm.name` selects are in `config.algorithm`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from archer_mcore.config.algorithm import AlgorithmConfig
from archer_mcore.config.fields import checked as _f


# --------------------------------------------------------------------------- sections
@dataclass(kw_only=True)
class ArchConfig:
    """Architecture of an inline model (used when `model.path` is empty), HF names."""

    family: Literal["qwen2", "qwen3", "qwen3_moe"] = "qwen3"
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
    # family qwen3_moe only (written to its config.json; the dense families ignore them):
    # routed experts per layer, experts each token goes through (top-k), each expert's
    # SwiGLU width, and whether the top-k routing weights are renormalised to sum 1
    num_experts: int = _f(8, gt=0)
    num_experts_per_tok: int = _f(2, gt=0)
    moe_intermediate_size: int = _f(64, gt=0)
    norm_topk_prob: bool = True


@dataclass(kw_only=True)
class ModelConfig:
    path: str = ""  # HF model dir (config.json [+ safetensors]); empty: `arch`, random init
    tokenizer: str = ""  # tokenizer dir; empty: `path`, or the synthetic task's tokenizer
    arch: ArchConfig = field(default_factory=ArchConfig)
    transformer_impl: Literal["local", "transformer_engine"] = "local"
    params_dtype: Literal["auto", "float32", "bfloat16"] = "auto"  # auto: bf16 on GPU, fp32 on CPU
    fp8: Literal["none", "delayed", "tensorwise", "blockwise"] = "none"
    recompute: Literal["none", "selective", "full"] = "none"
    # MoE models (Qwen3-MoE; model/families/qwen3_moe.py): load balancing is off for RL
    # by default (slime's and verl's megatron recipes); > 0 turns megatron's aux loss /
    # router z-loss on with that coefficient
    moe_aux_loss_coeff: float = _f(0.0, ge=0)
    moe_z_loss_coeff: float = _f(0.0, ge=0)
    # how tokens reach their experts' EP ranks: megatron's all-to-all, or "flex"
    # (DeepEP's fused all-to-all; GPUs with DeepEP only)
    moe_token_dispatcher: Literal["alltoall", "flex"] = "alltoall"


@dataclass(kw_only=True)
class ParallelConfig:
    tensor_model_parallel_size: int = _f(1, ge=1)
    pipeline_model_parallel_size: int = _f(1, ge=1)
    # MoE: the routed experts split over this many ranks (EP; divides num_experts)
    expert_model_parallel_size: int = _f(1, ge=1)
    sequence_parallel: bool = False
    use_distributed_optimizer: bool = True
    micro_batch_tokens: int = _f(8192, gt=0)  # token budget of one micro-batch
    # CP: each micro-batch's tokens split over this many GPUs (ring attention). Needs
    # Transformer Engine on GPUs; `archer plan` models it, the trainer refuses CP > 1.
    context_parallel_size: int = _f(1, ge=1)
    # pack sequences into micro-batches (THD / block-diagonal mask) instead of padding rows
    pack_sequences: bool = True
    # how long a collective of the default process group (NCCL on GPUs) and megatron's
    # groups may wait before it fails (NCCL's watchdog then stops the job), seconds
    collective_timeout_s: float = _f(1800.0, gt=0)
    # how long the other ranks wait for rank 0's rollout, scoring and evaluation of one
    # step (a gloo group of its own, so that a long generation does not need a long
    # NCCL timeout); set it above the longest step's generation, seconds
    rollout_wait_timeout_s: float = _f(21600.0, gt=0)


@dataclass(kw_only=True)
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
    # file with the servers' and router's API key (`api-key: <key>`, mode 0600; the Slurm
    # script writes one per job); colocated: "" makes a fresh key per launch;
    # disaggregated: "" talks to servers started without a key (docs/sglang.md)
    api_key_file: str = ""


@dataclass(kw_only=True)
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
    # colocated SGLang: the trainer's optimizer state, fp32 main params and gradient
    # buffers go to host memory while the servers hold the GPUs (actor/offload.py)
    colocated_offload: bool = True
    sync_bucket_bytes: int = _f(512 * 1024 * 1024, gt=0)
    # FP8 rollout: servers start from a block-wise FP8 export and every sync sends e4m3
    # weights plus fp32 `_scale_inv` blocks (rollout/fp8_export.py)
    fp8: bool = False
    tis_cap: float | None = _f(None, gt=0)  # truncated importance sampling cap; None: off
    # 0: generate each step's batch, then train on it; 1: generate step k+1's batch on a
    # background thread while step k trains (one version stale; train/rollout_scheduler.py)
    async_steps: int = _f(0, ge=0, le=1)
    sglang: SGLangConfig = field(default_factory=SGLangConfig)


@dataclass(kw_only=True)
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


@dataclass(kw_only=True)
class SyntheticTaskConfig:
    """The synthetic arithmetic task used when `data.train_files` is empty."""

    min_operands: int = _f(2, ge=2)
    max_operands: int = _f(3, ge=2)
    min_value: int = _f(0, ge=0)
    max_value: int = _f(9, ge=0)
    operators: str = "+-*"


@dataclass(kw_only=True)
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


@dataclass(kw_only=True)
class RewardKindConfig:
    """One reward added from the config (`rewards.kinds`), without editing the package.

    name: the kind's name (rows name it in `reward_model.style` / `ability`, or
        `data.default_reward_kind`); "math" and "code" need `override: true`.
    fn: "package.module:function", imported at config load. process and inline kinds:
        fn(response, ground_truth, extra) -> RewardResult | bool | float; sandbox kinds
        get a fourth argument, the code sandbox. process kinds run in fresh worker
        interpreters, so fn must be a module-level function they can import
        (PYTHONPATH or an installed package).
    sources: data_source names or glob patterns routed to this kind, before the
        built-in routes.
    execution: process (a killable worker, `timeout_s`), sandbox or inline (a scorer
        thread; must be fast).
    timeout_s: process kinds only; null: rewards.math_timeout_s.
    graded: the result's score (in [0, 1]) is the reward: reward_incorrect +
        score * (reward_correct - reward_incorrect); false: pass/fail.
    override: replace the built-in kind of the same name.
    """

    name: str
    fn: str
    sources: list[str] = _f(factory=list)
    execution: Literal["process", "sandbox", "inline"] = "process"
    timeout_s: float | None = _f(None, gt=0, le=600)
    graded: bool = False
    override: bool = False


@dataclass(kw_only=True)
class RewardsConfig:
    # Bounded so that every accepted value makes a working sandbox / worker (a limit
    # the kernel refuses, e.g. code_timeout_s: 1e30, failed every run's setup); the
    # code limits lie within archer_mcore.rewards.sandbox.LIMIT_RANGES.
    math_timeout_s: float = _f(5.0, gt=0, le=600)
    code_timeout_s: float = _f(10.0, ge=1, le=600)  # wall and CPU seconds per program
    code_memory_mb: int = _f(1024, ge=64, le=1 << 20)  # address space per process
    num_workers: int = _f(4, ge=1, le=256)
    allow_unsandboxed_code: bool = False
    # numeric references: the answer must be a simplified number, not "0 - 9 - 0"
    math_strict_answer_form: bool = True
    # rewards added from the config (RewardKindConfig; README "Rewards")
    kinds: list[RewardKindConfig] = _f(factory=list)


@dataclass(kw_only=True)
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


@dataclass(kw_only=True)
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


@dataclass(kw_only=True)
class EvalConfig:
    every: int = _f(0, ge=0)  # 0: off
    n_samples: int = _f(16, ge=1)  # k of avg@k / pass@k
    temperature: float = _f(0.6, ge=0)
    top_p: float = _f(0.95, gt=0, le=1)
    max_new_tokens: int = _f(1024, gt=0)


@dataclass(kw_only=True)
class CheckpointConfig:
    dir: str = ""  # empty: <train.output_dir>/checkpoints
    save_every: int = _f(50, ge=0)  # 0: only at the end and on signals
    # also save after the first step that ends this many minutes after the last save
    # (or the run's start); 0: off. For steps so long that save_every is never reached
    # before a pre-emption (the 32B presets' steps take about an hour)
    every_minutes: float = _f(0.0, ge=0)
    keep_last: int = _f(3, ge=1)
    # the file system's write bandwidth for one checkpoint, all writing ranks together,
    # GB/s (1e9 bytes/s): `archer submit` derives the signal lead from the save time it
    # gives (archer_mcore/plan/stop.py)
    write_gb_per_s: float = _f(2.0, gt=0)


@dataclass(kw_only=True)
class MetricsConfig:
    enabled: bool = True
    # where rank 0 serves /metrics (read-only GET); "auto": this host's own address,
    # resolved where rank 0 runs (NCCL_SOCKET_IFNAME / GLOO_SOCKET_IFNAME interface, else
    # the host name's address): the Slurm scripts set it, as torchrun may put rank 0 on
    # any training node
    host: str = "127.0.0.1"
    # a folder Prometheus reads file_sd targets from (prometheus.yml's file_sd_configs):
    # rank 0 writes <Slurm job id, else train.run_name>.json there naming the host:port
    # it serves /metrics on, and removes it when the run ends; "": none
    targets_dir: str = ""
    port: int = _f(9400, ge=0, lt=65536)  # 0: any free port
    pushgateway: str = ""  # e.g. http://127.0.0.1:9091; empty: no push
    job: str = "archer"
    #: Experiment trackers that receive every metrics.jsonl row (rank 0 only), each
    #: through its own library: "tensorboard" (pip install 'archer-mcore[tensorboard]'),
    #: "wandb" ('archer-mcore[wandb]'), "mlflow" ('archer-mcore[mlflow]'). Empty: none.
    #: A tracker that fails is reported once and dropped; training goes on.
    trackers: list[Literal["tensorboard", "wandb", "mlflow"]] = _f(factory=list)
    #: The W&B project and the MLflow experiment the run is logged under (the run's
    #: name is train.run_name).
    tracker_project: str = "archer"
    #: TensorBoard event files' directory; empty: <train.output_dir>/tensorboard.
    tensorboard_dir: str = ""
    #: The MLflow tracking server (http://host:port) or store (sqlite:///mlflow.db, or
    #: file:///path with MLFLOW_ALLOW_FILE_STORE=true on mlflow 3); empty: MLflow's own
    #: default (the MLFLOW_TRACKING_URI environment variable, else its local store).
    mlflow_tracking_uri: str = ""


@dataclass(kw_only=True)
class SlurmConfig:
    partition: str = ""
    account: str = ""
    nodes: int = _f(1, ge=1)
    gpus_per_node: int = _f(8, ge=0)
    gpu_type: Literal["h800", "h100", "h200", "cpu"] = "h800"
    rollout_nodes: int = _f(0, ge=0)  # disaggregated: nodes that run SGLang servers
    time: str = "24:00:00"
    # SIGUSR1 this many seconds before the time limit (stop, checkpoint, requeue);
    # 0: `archer submit` derives it from the plan (archer_mcore/plan/stop.py)
    signal_lead_s: int = _f(0, ge=0)
    container_image: str = ""
    extra_sbatch: list[str] = _f(factory=list)


@dataclass(kw_only=True)
class KernelsConfig:
    mode: Literal["auto", "triton", "torch"] = "auto"  # auto: Triton on CUDA, torch elsewhere
    fused_lm_head: bool = False


@dataclass(kw_only=True)
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
