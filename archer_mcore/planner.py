"""`archer plan`: will a config fit its cluster, and how long will a step take?

Per-GPU memory of the training side (weights, gradients, optimizer states, activations
with and without recompute, logits/entropy buffers with and without the fused
kernels) and of the rollout side (SGLang weights and KV cache), and an estimated
step time split into rollout, weight sync and training, from FLOPs, memory bandwidth
and the config. When a layout does not fit, the planner says which side and which
term overflow, and suggests the nearest layout that fits.

Conventions (all sizes in bytes, per GPU, for the most loaded rank):

* Mixed precision as megatron-core trains it: bf16 weights (2 B/param), fp32 main
  gradients (4 B/param, megatron's `accumulate_allreduce_grads_in_fp32` default for
  bf16), and fp32 master weights plus Adam's two moments (12 B/param), the latter
  sharded over data-parallel ranks by the distributed optimizer. This is the 18 (or
  6 + 12 / DP) bytes per parameter of megatron's theoretical-memory formula. A KL
  term adds a frozen bf16 reference copy (2 B/param). FP8 training is counted with
  bf16 weight copies (conservative: FP8 parameter gather keeps them in 1 byte).
* Activations follow Korthikanti et al. (arXiv 2205.05198, table 2) tensor by tensor,
  generalised to SwiGLU, grouped-query attention, Qwen3's q/k norms and flash
  attention (no s x s score tensors; a fp32 log-sum-exp per head and token instead).
  A micro-batch holds at most `parallel.micro_batch_tokens` tokens, padding included.
  How many micro-batches a rank runs, and what share of their tokens is padding, come
  from the trainer's own batching code (`archer_mcore.actor.policy_batch`, packed
  sequences or padded rows as `parallel.pack_sequences` says) applied to an assumed
  length mix: prompts of `mean_prompt_tokens`, responses lognormal with mean
  `mean_response_fraction` x `rollout.max_new_tokens` and log-sd
  `response_length_sigma`, capped at `rollout.max_new_tokens` (deterministic
  quantiles, no sampling). Padding costs compute (training FLOPs scale with it).
  The first pipeline stage holds min(PP, micro-batches) micro-batches in flight (1F1B).
* The last stage also holds the logits of one micro-batch (vocab-parallel, V / TP
  columns per rank) and what the entropy / log-prob computation keeps for backward.
* Time estimates are roofline-style: matmul FLOPs at an assumed model-FLOPs
  utilisation, decode steps bounded by HBM bandwidth. They are for sizing a run, not
  a benchmark.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from archer_mcore.config import Config, ConfigError, load_config
from archer_mcore.model.hf_config import ModelShape, shape_from_hf_config

KIB, MIB, GIB = 1024, 1024**2, 1024**3

RecomputeMode = Literal["none", "selective", "full"]
LogitsPath = Literal["unfused", "chunked", "fused", "fused_lm_head"]


# --------------------------------------------------------------------------- hardware
@dataclass(frozen=True)
class GpuSpec:
    """Datasheet figures of one GPU (dense tensor-core peaks, one direction links)."""

    name: str
    memory_bytes: int
    bf16_flops: float  # dense BF16 tensor-core peak, FLOP/s
    fp8_flops: float  # dense FP8 tensor-core peak, FLOP/s
    hbm_bytes_per_s: float
    nvlink_bytes_per_s: float  # per GPU, one direction
    network_bytes_per_s: float  # per GPU (one 400 Gb/s NIC per GPU), one direction
    compute_capability: tuple[int, int] = (9, 0)  # Hopper: FP8 tensor cores


GPU_SPECS: dict[str, GpuSpec] = {
    # nvidia-smi reports 81559 MiB for the 80 GB parts and 143771 MiB for H200.
    "h800": GpuSpec("H800 SXM5 80GB", 81559 * MIB, 989.4e12, 1978.9e12, 3.35e12, 200e9, 50e9),
    "h100": GpuSpec("H100 SXM5 80GB", 81559 * MIB, 989.4e12, 1978.9e12, 3.35e12, 450e9, 50e9),
    "h200": GpuSpec("H200 SXM 141GB", 143771 * MIB, 989.4e12, 1978.9e12, 4.8e12, 450e9, 50e9),
}


@dataclass(frozen=True)
class Assumptions:
    """Knobs of the estimate that the config does not say.

    `gated_mlp`, `dropout` and `flash_attention` describe the layer; Qwen2/Qwen3 are
    SwiGLU without dropout and the trainer uses flash attention. The other values
    let the tests reproduce megatron's (GeLU, dropout, unfused attention) formula.
    """

    gated_mlp: bool = True
    dropout: bool = False
    flash_attention: bool = True
    usable_memory_fraction: float = 0.92  # the rest: CUDA context, NCCL, fragmentation
    sglang_min_free_bytes: int = 6 * GIB  # SGLang's activations/CUDA graphs outside its pool
    mfu_train: float = 0.35
    bandwidth_efficiency: float = 0.6  # achieved / peak HBM bandwidth when decoding
    mean_prompt_tokens: int = 256
    mean_response_fraction: float = 0.5  # mean response length / max_new_tokens
    response_length_sigma: float = 0.8  # log-sd of the (lognormal) response lengths
    torch_chunk_rows: int = 4096  # rows per chunk of the torch entropy reference (the policy's)
    te_version: str | None = "2.8.0"  # Transformer Engine on the cluster (None: not installed)
    lm_head_chunk_rows: int = 4096  # rows per chunk of the fused linear-head kernel


# --------------------------------------------------------------------------- model
def shape_from_config(cfg: Config, config_path: str | Path | None = None) -> ModelShape:
    """The model's shape from `model.path`'s config.json, else from `model.arch`.

    A relative `model.path` is tried from the working directory, then from the
    directory above the config file's (the repository root for `configs/*.yaml`).
    """
    if cfg.model.path:
        candidates = [Path(cfg.model.path)]
        if config_path is not None:
            here = Path(config_path).resolve().parent
            candidates += [here / cfg.model.path, here.parent / cfg.model.path]
        for cand in candidates:
            if (cand / "config.json").is_file():
                return shape_from_hf_config(cand)
        raise ConfigError(f"model.path = {cfg.model.path!r}: no config.json found there")
    a = cfg.model.arch
    return shape_from_hf_config(
        {
            "model_type": a.family,
            "vocab_size": a.vocab_size,
            "hidden_size": a.hidden_size,
            "intermediate_size": a.intermediate_size,
            "num_hidden_layers": a.num_hidden_layers,
            "num_attention_heads": a.num_attention_heads,
            "num_key_value_heads": a.num_key_value_heads,
            "head_dim": a.head_dim,
            "rope_theta": a.rope_theta,
            "rms_norm_eps": a.rms_norm_eps,
            "max_position_embeddings": a.max_position_embeddings,
            "tie_word_embeddings": a.tie_word_embeddings,
        }
    )


def attention_params(m: ModelShape) -> int:
    """q, k, v, o projections (+ q/k/v biases for Qwen2, + q/k norms for Qwen3)."""
    a, g, d, h = m.num_heads, m.num_kv_heads, m.head_dim, m.hidden_size
    n = h * d * (a + 2 * g) + a * d * h
    if m.qkv_bias:
        n += d * (a + 2 * g)
    if m.qk_norm:
        n += 2 * d
    return n


def mlp_params(m: ModelShape, gated: bool = True) -> int:
    return (3 if gated else 2) * m.hidden_size * m.ffn_hidden_size


def layer_params(m: ModelShape, gated: bool = True) -> int:
    """One decoder layer: attention, MLP and its two RMSNorm weights."""
    return attention_params(m) + mlp_params(m, gated) + 2 * m.hidden_size


def total_params(m: ModelShape, vocab: int | None = None, gated: bool = True) -> int:
    v = m.vocab_size if vocab is None else vocab
    embed = v * m.hidden_size * (1 if m.tie_embeddings else 2)
    return m.num_layers * layer_params(m, gated) + embed + m.hidden_size


def matmul_params_per_token(m: ModelShape) -> int:
    """Weights one token multiplies through: all layer matmuls and the LM head."""
    a, g, d, h = m.num_heads, m.num_kv_heads, m.head_dim, m.hidden_size
    per_layer = h * d * (a + 2 * g) + a * d * h + 3 * h * m.ffn_hidden_size
    return m.num_layers * per_layer + m.vocab_size * h


# --------------------------------------------------------------------------- layouts
@dataclass(frozen=True)
class TrainLayout:
    """How the trainer splits the policy over its GPUs."""

    gpus: int
    tp: int = 1
    pp: int = 1
    sequence_parallel: bool = False
    recompute: RecomputeMode = "none"
    distributed_optimizer: bool = True
    micro_batch_tokens: int = 8192
    logits_path: LogitsPath = "fused"
    fp8: bool = False
    cp: int = 1  # context parallel: a micro-batch's tokens split over cp GPUs
    pack_sequences: bool = True

    @property
    def dp(self) -> int:
        return self.gpus // (self.tp * self.pp * self.cp)

    @property
    def model_parallel(self) -> int:
        """GPUs one model replica spans: TP x PP x CP."""
        return self.tp * self.pp * self.cp

    @property
    def seq_multiple(self) -> int:
        """What micro-batch lengths are rounded up to, as `model.build` decides it:
        TP under sequence parallelism, x16 under FP8."""
        from archer_mcore.model.build import FP8_TOKEN_MULTIPLE

        sp = self.tp if self.sequence_parallel and self.tp > 1 else 1
        return sp * (FP8_TOKEN_MULTIPLE if self.fp8 else 1)

    def describe(self) -> str:
        cp = f" CP{self.cp}" if self.cp > 1 else ""
        return (
            f"TP{self.tp} PP{self.pp}{cp} DP{self.dp}, "
            f"SP {'on' if self.sequence_parallel else 'off'}, "
            f"recompute {self.recompute}, distributed optimizer "
            f"{'on' if self.distributed_optimizer else 'off'}, micro-batch "
            f"{self.micro_batch_tokens} tokens "
            f"({'packed sequences' if self.pack_sequences else 'padded rows'}), "
            f"logits path {self.logits_path}"
        )


@dataclass(frozen=True)
class RolloutLayout:
    """SGLang servers: `num_servers` x `tp` GPUs, static memory fraction per GPU."""

    num_servers: int
    tp: int
    mem_fraction_static: float
    fp8_weights: bool = False
    colocated: bool = False

    def describe(self) -> str:
        mode = "colocated" if self.colocated else "disaggregated"
        return (
            f"{self.num_servers} SGLang server(s) x TP{self.tp} ({mode}), "
            f"mem_fraction_static {self.mem_fraction_static:g}, weights "
            f"{'fp8' if self.fp8_weights else 'bf16'}"
        )


@dataclass(frozen=True)
class Workload:
    """One RL step: what is generated and trained on."""

    prompts_per_step: int
    samples_per_prompt: int
    mini_batch_prompts: int
    ppo_epochs: int
    max_prompt_tokens: int
    max_new_tokens: int
    needs_reference: bool  # a KL term: one reference forward per step

    @property
    def sequences(self) -> int:
        return self.prompts_per_step * self.samples_per_prompt

    @property
    def max_sequence_tokens(self) -> int:
        return self.max_prompt_tokens + self.max_new_tokens


# --------------------------------------------------------------------------- training memory
def layer_activation_bytes_per_token(
    m: ModelShape,
    tp: int,
    sequence_parallel: bool,
    recompute: RecomputeMode,
    seq_len: int,
    assume: Assumptions,
) -> float:
    """Bytes one token leaves saved for backward in one decoder layer, per TP rank.

    Korthikanti et al.'s inventory, 16-bit activations, 1-byte dropout masks:
    replicated over TP unless sequence parallel (norm inputs, the inputs of the QKV
    and first MLP matmuls: 2h each; dropout masks: h each), and split over TP (q, k,
    v; q/k-norm inputs; attention output = o_proj input; the MLP's gate/up output and
    down-proj input). Without flash attention the softmax output (2 a s, and with
    dropout its mask and output: 5 a s) is kept unless selective recompute drops it;
    flash attention keeps a fp32 log-sum-exp per head instead. Full recompute keeps
    only each layer's input (2h).
    """
    a, g, d, h, f = m.num_heads, m.num_kv_heads, m.head_dim, m.hidden_size, m.ffn_hidden_size
    sp_div = tp if sequence_parallel else 1
    if recompute == "full":
        return 2 * h / sp_div
    replicated = 8 * h + (2 * h if assume.dropout else 0)
    split = 2 * (a + 2 * g) * d + 2 * a * d  # q, k, v and the attention output
    if m.qk_norm:
        split += 2 * (a + g) * d
    split += 2 * f * (2 if assume.gated_mlp else 1) + 2 * f  # fc1 output, fc2 input
    if assume.flash_attention:
        split += 0 if recompute == "selective" else 4 * a
    elif recompute != "selective":
        split += a * seq_len * (5 if assume.dropout else 2)
    return replicated / sp_div + split / tp


def embedding_activation_bytes_per_token(
    m: ModelShape, tp: int, sequence_parallel: bool, assume: Assumptions
) -> float:
    """Token ids (int64, replicated) and the embedding dropout mask (1 B x h)."""
    mask = m.hidden_size / (tp if sequence_parallel else 1) if assume.dropout else 0.0
    return 8 + mask


def logits_bytes(
    m: ModelShape, tokens: int, tp: int, path: LogitsPath, assume: Assumptions
) -> float:
    """What the log-prob/entropy computation of one micro-batch holds at its peak.

    V_p = padded vocab / TP columns per rank, n = tokens:
    * unfused (plain torch ops): bf16 logits 2, their fp32 copy 4, the saved
      log-softmax 4 and probabilities 4, the fp32 gradient 4: 18 n V_p.
    * chunked (this repo's torch reference): bf16 logits and their bf16 gradient,
      4 n V_p, plus four fp32 [chunk_rows, V_p] temporaries.
    * fused (Triton, vocab-parallel): 4 n V_p, per-token statistics only.
    * fused_lm_head (matmul + entropy in chunks): no logits tensor; a bf16 and a fp32
      [lm_head_chunk_rows, V_p] chunk.
    """
    vp = m.padded_vocab_size(tp) / tp
    if path == "unfused":
        return 18 * tokens * vp
    if path == "chunked":
        return 4 * tokens * vp + 16 * min(tokens, assume.torch_chunk_rows) * vp
    if path == "fused":
        return 4 * tokens * vp
    if path == "fused_lm_head":
        return 6 * min(tokens, assume.lm_head_chunk_rows) * vp
    raise ValueError(f"unknown logits path {path!r}")


@dataclass
class StageMemory:
    """Bytes on one GPU of one pipeline stage."""

    params: int
    weights: float
    gradients: float
    optimizer: float
    activations: float
    logits: float
    reference: float = 0.0  # a frozen bf16 copy of the stage's weights, when a KL term needs it

    @property
    def total(self) -> float:
        return (
            self.weights
            + self.gradients
            + self.optimizer
            + self.activations
            + self.logits
            + self.reference
        )


@dataclass
class TrainingMemory:
    """Per-GPU training memory: the chosen layout's figures plus the alternatives."""

    first: StageMemory
    last: StageMemory
    activations_by_recompute: dict[str, float]  # first stage, every recompute mode
    logits_by_path: dict[str, float]  # last stage, every logits path
    microbatches: int  # per mini-batch and data-parallel rank
    in_flight: int
    batching: MicroBatchEstimate | None = None

    @property
    def peak(self) -> StageMemory:
        return self.first if self.first.total >= self.last.total else self.last


def stage_params(m: ModelShape, tp: int, pp: int, stage: Literal["first", "last"]) -> int:
    """Parameters one TP rank of a pipeline stage holds (first: + embedding;
    last: + final norm and output layer; PP=1: all). Vocab padded as megatron does."""
    vocab = m.padded_vocab_size(tp)
    embed = vocab * m.hidden_size
    layers = (m.num_layers // pp) * layer_params(m)
    if pp == 1:
        n = layers + embed + (0 if m.tie_embeddings else embed) + m.hidden_size
    elif stage == "first":
        n = layers + embed
    else:  # the last stage holds an output layer even when tied (a copy kept in sync)
        n = layers + embed + m.hidden_size
    return math.ceil(n / tp)


def cp_tokens_per_gpu(layout: TrainLayout) -> int:
    """Tokens of one micro-batch on one GPU: CP splits each micro-batch's sequence
    dimension over `cp` ranks (megatron cuts it into 2 x cp chunks, rank r taking
    chunks r and 2cp - 1 - r so that causal attention work is balanced)."""
    return math.ceil(layout.micro_batch_tokens / layout.cp)


def cp_kv_bytes_per_token(m: ModelShape, tp: int) -> float:
    """bf16 K and V of one token in one layer on one TP rank: 2 x 2 B x (g / TP) x d."""
    return 4 * m.num_kv_heads * m.head_dim / tp


def cp_ring_buffer_bytes(m: ModelShape, layout: TrainLayout) -> float:
    """What ring attention holds beyond the layer inventory (CP > 1): one K/V chunk
    of another rank arriving while the local one is used (forward), and in backward
    that chunk plus the dK/dV chunk travelling the other way: two chunks of t / CP
    tokens of one layer's K and V. 0 at CP 1."""
    if layout.cp <= 1:
        return 0.0
    return 2 * cp_tokens_per_gpu(layout) * cp_kv_bytes_per_token(m, layout.tp)


@dataclass(frozen=True)
class MicroBatchEstimate:
    """One data-parallel rank's micro-batches for one mini-batch of the assumed length
    mix, as the trainer's batching code forms them."""

    packed: bool
    count: int
    sequences: int
    tokens: int  # the sequences' own tokens
    tokens_run: int  # what the micro-batches run through the model, padding included

    @property
    def padded_fraction(self) -> float:
        return 1.0 - self.tokens / max(self.tokens_run, 1)


def assumed_sequence_lengths(n: int, work: Workload, assume: Assumptions) -> list[int]:
    """`n` sequence lengths of the assumed mix: prompt min(mean_prompt_tokens,
    max_prompt_tokens) plus a response at the (i + 1/2)/n quantiles of a lognormal
    with mean mean_response_fraction x max_new_tokens and log-sd
    response_length_sigma, capped at max_new_tokens and at least 1."""
    from statistics import NormalDist

    prompt = max(1, min(assume.mean_prompt_tokens, work.max_prompt_tokens))
    mean = max(assume.mean_response_fraction * work.max_new_tokens, 1.0)
    sigma = assume.response_length_sigma
    mu = math.log(mean) - sigma * sigma / 2
    z = NormalDist()
    out = []
    for i in range(n):
        r = math.exp(mu + sigma * z.inv_cdf((i + 0.5) / n)) if sigma > 0 else mean
        out.append(prompt + max(1, min(work.max_new_tokens, round(r))))
    return out


def microbatch_estimate(
    layout: TrainLayout, work: Workload, assume: Assumptions
) -> MicroBatchEstimate:
    """`plan_microbatches` (the trainer's) over one rank's share of a mini-batch of
    `assumed_sequence_lengths`, with the layout's budget, packing and length multiple."""
    n = max(1, math.ceil(work.mini_batch_prompts * work.samples_per_prompt / max(layout.dp, 1)))
    return _estimate(
        tuple(assumed_sequence_lengths(n, work, assume)),
        layout.micro_batch_tokens,
        layout.seq_multiple,
        layout.pack_sequences,
    )


@functools.lru_cache(maxsize=4096)
def _estimate(
    lengths: tuple[int, ...], budget: int, multiple: int, pack: bool
) -> MicroBatchEstimate:
    import torch

    from archer_mcore.actor.policy_batch import plan_microbatches

    plan = plan_microbatches(torch.tensor(lengths), budget, seq_multiple=multiple, pack=pack)
    return MicroBatchEstimate(pack, len(plan.rows), len(lengths), sum(lengths), sum(plan.tokens()))


def microbatches_per_rank(layout: TrainLayout, work: Workload, assume: Assumptions) -> int:
    """Micro-batches one data-parallel rank runs per mini-batch (`microbatch_estimate`)."""
    return microbatch_estimate(layout, work, assume).count


def training_memory(
    m: ModelShape, layout: TrainLayout, work: Workload, assume: Assumptions = Assumptions()
) -> TrainingMemory:
    tp, pp = layout.tp, layout.pp
    t = cp_tokens_per_gpu(layout)  # a micro-batch's tokens on one GPU (all of them at CP 1)
    nmb = microbatches_per_rank(layout, work, assume)
    in_flight = min(pp, nmb) if pp > 1 else 1
    seq = min(t, work.max_sequence_tokens)

    def acts(stage: str, recompute: RecomputeMode) -> float:
        per_layer = layer_activation_bytes_per_token(
            m, tp, layout.sequence_parallel, recompute, seq, assume
        )
        layers = m.num_layers // pp
        per_mb = layers * per_layer
        if stage == "first":
            per_mb += embedding_activation_bytes_per_token(m, tp, layout.sequence_parallel, assume)
        held = t * per_mb * (in_flight if stage == "first" else 1)
        if recompute == "full":  # one layer's activations live again during its backward
            held += t * layer_activation_bytes_per_token(
                m, tp, layout.sequence_parallel, "none", seq, assume
            )
        return held + cp_ring_buffer_bytes(m, layout)

    grad_bytes, weight_bytes = 4.0, 2.0
    # megatron's distributed optimizer shards over the data-parallel group with CP
    opt_bytes = 12.0 / (layout.dp * layout.cp) if layout.distributed_optimizer else 12.0

    def stage(which: Literal["first", "last"]) -> StageMemory:
        n = stage_params(m, tp, pp, which)
        has_logits = which == "last"
        return StageMemory(
            params=n,
            weights=n * weight_bytes,
            gradients=n * grad_bytes,
            optimizer=n * opt_bytes,
            activations=acts(which, layout.recompute),
            logits=logits_bytes(m, t, tp, layout.logits_path, assume) if has_logits else 0.0,
            reference=n * weight_bytes if work.needs_reference else 0.0,
        )

    first, last = stage("first"), stage("last")
    if pp == 1:  # one stage is both: activations with embedding and the logits
        first.logits = last.logits
        last = first
    return TrainingMemory(
        first=first,
        last=last,
        activations_by_recompute={r: acts("first", r) for r in ("none", "selective", "full")},
        logits_by_path={
            p: logits_bytes(m, t, tp, p, assume)
            for p in ("unfused", "chunked", "fused", "fused_lm_head")
        },
        microbatches=nmb,
        in_flight=in_flight,
        batching=microbatch_estimate(layout, work, assume),
    )


# --------------------------------------------------------------------------- rollout memory
def kv_bytes_per_token(m: ModelShape, tp: int, kv_dtype_bytes: int = 2) -> float:
    """K and V of every layer for one token on one TP rank. KV heads split over TP
    (replicated when TP exceeds the number of KV heads, as SGLang does)."""
    heads = math.ceil(m.num_kv_heads / tp)
    return 2 * m.num_layers * heads * m.head_dim * kv_dtype_bytes


def rollout_weight_bytes(m: ModelShape, tp: int, fp8: bool) -> float:
    """Weights on one rollout GPU: layer matmuls 2 B (1 B + scales with FP8),
    embedding / LM head / norms in bf16."""
    matmuls = m.num_layers * (
        m.hidden_size * m.head_dim * (m.num_heads + 2 * m.num_kv_heads)
        + m.num_heads * m.head_dim * m.hidden_size
        + 3 * m.hidden_size * m.ffn_hidden_size
    )
    rest = total_params(m) - matmuls
    return (matmuls * (1 if fp8 else 2) + rest * 2) / tp


@dataclass
class RolloutMemory:
    weights: float
    kv_pool: float  # the KV cache SGLang can allocate on one GPU
    kv_per_token: float  # one GPU's share of one token's KV
    kv_for_batch: float  # the whole step's sequences at full length, summed over all GPUs
    static_budget: float  # mem_fraction_static x the memory SGLang may use
    free_outside_pool: float
    concurrent_full_sequences: int  # per server, at prompt + max_new_tokens

    @property
    def total(self) -> float:
        return self.static_budget


def rollout_memory(
    m: ModelShape,
    layout: RolloutLayout,
    work: Workload,
    gpu: GpuSpec,
    assume: Assumptions = Assumptions(),
    reserved_by_trainer: float = 0.0,
) -> RolloutMemory:
    """SGLang's static pool is `mem_fraction_static` of the GPU memory it sees free
    (colocated: what the trainer's weights, gradients and optimizer leave)."""
    available = gpu.memory_bytes - reserved_by_trainer
    budget = layout.mem_fraction_static * available
    weights = rollout_weight_bytes(m, layout.tp, layout.fp8_weights)
    pool = max(0.0, budget - weights)
    kv_tok = kv_bytes_per_token(m, layout.tp)
    tp_total_kv = kv_tok * layout.tp * work.sequences * work.max_sequence_tokens
    return RolloutMemory(
        weights=weights,
        kv_pool=pool,
        kv_per_token=kv_tok,
        kv_for_batch=tp_total_kv,
        static_budget=budget,
        free_outside_pool=available - budget,
        concurrent_full_sequences=int(pool // (kv_tok * work.max_sequence_tokens)),
    )


# --------------------------------------------------------------------------- time
@dataclass
class StepTime:
    rollout_s: float
    weight_sync_s: float
    training_s: float
    train_flops: float
    decode_step_s: float
    concurrency: int  # sequences decoding together per server
    cp_comm_s: float = 0.0  # ring-attention K/V traffic, part of training_s

    @property
    def total_s(self) -> float:
        return self.rollout_s + self.weight_sync_s + self.training_s


def forward_flops_per_token(m: ModelShape, mean_context: float) -> float:
    """2 x matmul weights + causal attention (QK^T and AV over half the context)."""
    attn = 2 * 2 * m.num_layers * m.num_heads * m.head_dim * mean_context / 2
    return 2 * matmul_params_per_token(m) + attn


def cp_comm_bytes(
    m: ModelShape, train: TrainLayout, work: Workload, assume: Assumptions = Assumptions()
) -> float:
    """Bytes one GPU sends per RL step for ring attention (0 at CP 1).

    Per layer and micro-batch, each CP rank passes a K/V chunk of t / CP tokens on
    CP - 1 times in a forward; a backward passes K/V again and dK/dV back: twice that.
    Summed over the step's tokens on one data-parallel rank (sequences x mean length /
    DP), its layers (L / PP), and the passes: old log-probs (+ reference) forwards and,
    per PPO epoch, a forward (+ the recompute forward under full recompute) and a
    backward."""
    cp = train.cp
    if cp <= 1:
        return 0.0
    seq = min(assume.mean_prompt_tokens, work.max_prompt_tokens) + (
        assume.mean_response_fraction * work.max_new_tokens
    )
    tokens_per_gpu = work.sequences * seq / train.dp / cp
    forwards = 1 + (1 if work.needs_reference else 0)
    forwards += work.ppo_epochs * (1 + (1 if train.recompute == "full" else 0))
    backwards = work.ppo_epochs
    per_pass = (
        (m.num_layers // train.pp) * tokens_per_gpu * (cp - 1) * cp_kv_bytes_per_token(m, train.tp)
    )
    return per_pass * (forwards + 2 * backwards)


def step_time(
    m: ModelShape,
    train: TrainLayout,
    roll: RolloutLayout,
    work: Workload,
    gpu: GpuSpec,
    rmem: RolloutMemory,
    assume: Assumptions = Assumptions(),
    gpus_per_node: int = 8,
) -> StepTime:
    prompt = min(assume.mean_prompt_tokens, work.max_prompt_tokens)
    resp = assume.mean_response_fraction * work.max_new_tokens
    seq = prompt + resp
    # Rollout: each server decodes its share with continuous batching; a decode step
    # reads the server's weights once and the running sequences' KV cache.
    per_server = math.ceil(work.sequences / roll.num_servers)
    mean_ctx = prompt + resp / 2
    fit = int(rmem.kv_pool // max(rmem.kv_per_token * mean_ctx, 1.0))
    conc = max(1, min(per_server, fit))
    bw = gpu.hbm_bytes_per_s * assume.bandwidth_efficiency
    mem_t = (rmem.weights + conc * mean_ctx * rmem.kv_per_token) / bw
    peak = gpu.fp8_flops if roll.fp8_weights else gpu.bf16_flops
    compute_t = conc * forward_flops_per_token(m, mean_ctx) / (roll.tp * peak * 0.5)
    decode_step = max(mem_t, compute_t)
    steps = max(work.max_new_tokens, per_server * resp / conc)
    prefill = per_server * prompt * forward_flops_per_token(m, prompt / 2) / (roll.tp * peak * 0.5)
    rollout_s = steps * decode_step + prefill
    # Training: old log-probs (+ reference) forwards, then epochs of fwd + 2x bwd
    # (+ one more forward under full recompute).
    # padding runs through the model too: scale by the micro-batches' tokens / real tokens
    est = microbatch_estimate(train, work, assume)
    tokens = work.sequences * seq * est.tokens_run / max(est.tokens, 1)
    fwd = tokens * forward_flops_per_token(m, seq)
    passes = 1 + (1 if work.needs_reference else 0)
    passes += work.ppo_epochs * (3 + (1 if train.recompute == "full" else 0))
    flops = fwd * passes
    tpeak = gpu.fp8_flops if train.fp8 else gpu.bf16_flops
    nmb = microbatches_per_rank(train, work, assume)
    bubble = (train.pp - 1) / nmb if train.pp > 1 else 0.0
    training_s = flops / (train.gpus * tpeak * assume.mfu_train) * (1 + bubble)
    # CP: ring attention's K/V traffic, counted as not overlapped with compute (an upper
    # bound; TE overlaps it with the attention of the chunk at hand). NVLink while the
    # TP x CP ranks of a group share a node (megatron orders ranks TP, CP, DP, PP).
    cp_link = (
        gpu.nvlink_bytes_per_s if train.tp * train.cp <= gpus_per_node else gpu.network_bytes_per_s
    )
    cp_comm_s = cp_comm_bytes(m, train, work, assume) / cp_link
    training_s += cp_comm_s
    # Weight sync: the bf16 weights leave the trainer through one link (the bucketed
    # broadcast from the gathering rank; NVLink/IPC when colocated, the NIC otherwise).
    link = gpu.nvlink_bytes_per_s if roll.colocated else gpu.network_bytes_per_s
    sync_s = 2 * total_params(m) / link
    return StepTime(rollout_s, sync_s, training_s, flops, decode_step, conc, cp_comm_s)


# --------------------------------------------------------------------------- planning
@dataclass(frozen=True)
class Cluster:
    nodes: int
    gpus_per_node: int
    gpu: str
    rollout_nodes: int

    @property
    def spec(self) -> GpuSpec:
        return GPU_SPECS[self.gpu]


@dataclass
class Plan:
    model: ModelShape
    cluster: Cluster
    train: TrainLayout
    rollout: RolloutLayout
    work: Workload
    training: TrainingMemory
    rollout_mem: RolloutMemory
    time: StepTime
    problems: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def fits(self) -> bool:
        return not self.problems


def workload_from_config(cfg: Config) -> Workload:
    a = cfg.algorithm
    return Workload(
        prompts_per_step=cfg.train.prompts_per_step,
        samples_per_prompt=cfg.rollout.n_samples_per_prompt,
        mini_batch_prompts=cfg.train.mini_batch_prompts,
        ppo_epochs=cfg.train.ppo_epochs,
        max_prompt_tokens=cfg.data.max_prompt_length,
        max_new_tokens=cfg.rollout.max_new_tokens,
        needs_reference=a.kl_coef > 0 or a.reasoning_kl_coef > 0,
    )


def resolved_choices(
    cfg: Config,
    te_version: str | None,
    device_capability: tuple[int, int] | None,
    cuda: bool = True,
    triton_compiles: bool | None = True,
) -> Any:
    """The trainer's own choices for this config on a machine (TE version, GPU
    capability, CUDA, whether triton compiles): `MegatronPolicy` builds with exactly
    `resolve_policy_choices`, so what the plan sizes is what the trainer builds.
    Returns a `PolicyChoices`; raises ValueError for contradictory settings (e.g. FP8
    with the local layers, sequence parallelism at TP=1)."""
    from archer_mcore.actor.policy_config import PolicyConfig, resolve_policy_choices

    pcfg = PolicyConfig(
        model=cfg.model, parallel=cfg.parallel, optimizer=cfg.optimizer, kernels=cfg.kernels
    )
    return resolve_policy_choices(pcfg, te_version, device_capability, cuda, triton_compiles)


def logits_path_of(choices: Any) -> LogitsPath:
    """The planner's logits-buffer model for the policy's kernel path: the Triton fused
    LM head never materialises logits; the Triton entropy kernel reads the
    vocab-parallel logits; the torch reference (also behind the fused-LM-head switch,
    whose torch path makes the logits) works on them in row chunks."""
    path = choices.kernel_path
    if path.mode == "torch":
        return "chunked"
    return "fused_lm_head" if path.fused_lm_head else "fused"


def replace_sp_for_tp1(cfg: Config) -> Config:
    """`cfg` with sequence parallelism off when TP = 1 (the planner reports that setting
    as a problem itself, naming the key; the other choices are still planned)."""
    p = cfg.parallel
    if p.sequence_parallel and p.tensor_model_parallel_size == 1:
        return dataclasses.replace(cfg, parallel=dataclasses.replace(p, sequence_parallel=False))
    return cfg


def cluster_from_config(
    cfg: Config, nodes: int | None = None, gpus_per_node: int | None = None, gpu: str | None = None
) -> Cluster:
    gpu_type = gpu or cfg.slurm.gpu_type
    if gpu_type not in GPU_SPECS:
        raise ConfigError(
            f"slurm.gpu_type = {gpu_type!r}: the planner needs one of {', '.join(GPU_SPECS)} "
            "(pass --gpu)"
        )
    gpn = gpus_per_node if gpus_per_node is not None else cfg.slurm.gpus_per_node
    if gpn < 1:
        raise ConfigError("slurm.gpus_per_node must be >= 1 for a GPU plan (pass --gpus-per-node)")
    return Cluster(
        nodes=nodes if nodes is not None else cfg.slurm.nodes,
        gpus_per_node=gpn,
        gpu=gpu_type,
        rollout_nodes=cfg.slurm.rollout_nodes,
    )


def layouts_from_config(
    cfg: Config,
    cluster: Cluster,
    assume: Assumptions = Assumptions(),
    choices: Any | None = None,
) -> tuple[TrainLayout, RolloutLayout]:
    """The layouts the config asks for. Sequence parallelism, FP8 and the logits path
    are the trainer's resolved choices (`resolved_choices`) on the cluster's GPUs with
    `assume.te_version`, unless `choices` (a `PolicyChoices`) is given."""
    disagg = cfg.rollout.mode == "disaggregated"
    train_nodes = cluster.nodes - cluster.rollout_nodes if disagg else cluster.nodes
    p = cfg.parallel
    if choices is None:
        choices = resolved_choices(
            replace_sp_for_tp1(cfg), assume.te_version, cluster.spec.compute_capability
        )
    train = TrainLayout(
        gpus=max(0, train_nodes) * cluster.gpus_per_node,
        tp=p.tensor_model_parallel_size,
        pp=p.pipeline_model_parallel_size,
        # SP at TP = 1 stays visible here so that check_layout names the key.
        sequence_parallel=choices.build.sequence_parallel or p.sequence_parallel,
        recompute=cfg.model.recompute,
        distributed_optimizer=p.use_distributed_optimizer,
        micro_batch_tokens=p.micro_batch_tokens,
        logits_path=logits_path_of(choices),
        fp8=choices.build.precision.fp8_enabled,
        cp=p.context_parallel_size,
        pack_sequences=p.pack_sequences,
    )
    s = cfg.rollout.sglang
    roll = RolloutLayout(
        num_servers=s.num_servers,
        tp=s.tp_size,
        mem_fraction_static=s.mem_fraction_static,
        fp8_weights=cfg.rollout.fp8,
        colocated=not disagg,
    )
    return train, roll


def check_layout(
    m: ModelShape, cluster: Cluster, train: TrainLayout, roll: RolloutLayout, work: Workload
) -> list[str]:
    """Everything that makes a layout impossible, each naming the config key."""
    errs: list[str] = []
    tp, pp = train.tp, train.pp
    if train.gpus <= 0:
        errs.append(
            f"no training GPUs: slurm.nodes ({cluster.nodes}) must exceed slurm.rollout_nodes "
            f"({cluster.rollout_nodes})"
        )
        return errs
    if train.gpus % (tp * pp):
        errs.append(
            f"{train.gpus} training GPUs are not a multiple of TP x PP = {tp * pp} "
            "(parallel.tensor_model_parallel_size x parallel.pipeline_model_parallel_size)"
        )
    elif train.gpus % train.model_parallel:
        errs.append(
            f"{train.gpus} training GPUs are not a multiple of TP x PP x CP = "
            f"{train.model_parallel} (parallel.context_parallel_size = {train.cp})"
        )
    if tp > cluster.gpus_per_node:
        errs.append(f"TP {tp} spans more than one node ({cluster.gpus_per_node} GPUs per node)")
    if m.num_heads % tp or m.num_kv_heads % tp:
        errs.append(
            f"parallel.tensor_model_parallel_size = {tp} must divide the attention heads "
            f"({m.num_heads}) and the KV heads ({m.num_kv_heads})"
        )
    if m.num_layers % pp:
        errs.append(
            f"parallel.pipeline_model_parallel_size = {pp} must divide num_layers ({m.num_layers})"
        )
    if train.sequence_parallel and tp == 1:
        errs.append("parallel.sequence_parallel needs tensor_model_parallel_size > 1")
    if train.micro_batch_tokens < work.max_sequence_tokens:
        errs.append(
            f"parallel.micro_batch_tokens = {train.micro_batch_tokens} is below the longest "
            f"sequence (data.max_prompt_length + rollout.max_new_tokens = "
            f"{work.max_sequence_tokens}): one response would not fit a micro-batch"
        )
    gpus_rollout = (
        cluster.nodes * cluster.gpus_per_node
        if roll.colocated
        else cluster.rollout_nodes * cluster.gpus_per_node
    )
    if not roll.colocated and cluster.rollout_nodes < 1:
        errs.append("rollout.mode = disaggregated needs slurm.rollout_nodes >= 1")
    elif roll.num_servers * roll.tp > gpus_rollout:
        errs.append(
            f"rollout.sglang.num_servers x tp_size = {roll.num_servers * roll.tp} exceeds the "
            f"{gpus_rollout} rollout GPUs"
        )
    if m.num_heads % roll.tp:
        errs.append(
            f"rollout.sglang.tp_size = {roll.tp} must divide the attention heads ({m.num_heads})"
        )
    if roll.tp > cluster.gpus_per_node:
        errs.append(f"rollout.sglang.tp_size {roll.tp} spans more than one node")
    return errs


def memory_problems(plan: Plan, assume: Assumptions) -> list[str]:
    gpu = plan.cluster.spec
    usable = gpu.memory_bytes * assume.usable_memory_fraction
    errs = []
    peak = plan.training.peak
    if peak.total > usable:
        errs.append(
            f"training needs {peak.total / GIB:.1f} GiB per GPU, more than the "
            f"{usable / GIB:.1f} GiB usable on a {gpu.name}"
        )
    r = plan.rollout_mem
    if r.concurrent_full_sequences < 1:
        errs.append(
            f"SGLang KV pool ({r.kv_pool / GIB:.1f} GiB per GPU after {r.weights / GIB:.1f} GiB "
            f"of weights) cannot hold one {plan.work.max_sequence_tokens}-token sequence "
            f"({r.kv_per_token * plan.work.max_sequence_tokens / GIB:.2f} GiB)"
        )
    if r.free_outside_pool < assume.sglang_min_free_bytes:
        errs.append(
            f"rollout.sglang.mem_fraction_static = {plan.rollout.mem_fraction_static:g} leaves "
            f"{r.free_outside_pool / GIB:.1f} GiB outside SGLang's pool, under the "
            f"{assume.sglang_min_free_bytes / GIB:.0f} GiB its activations and CUDA graphs need"
        )
    return errs


def make_plan(
    m: ModelShape,
    cluster: Cluster,
    train: TrainLayout,
    roll: RolloutLayout,
    work: Workload,
    assume: Assumptions = Assumptions(),
) -> Plan:
    tmem = training_memory(m, train, work, assume) if train.gpus > 0 and train.dp > 0 else None
    if tmem is None:  # no training GPUs: still report the rollout side
        tmem = training_memory(
            m, dataclasses.replace(train, gpus=train.model_parallel), work, assume
        )
    reserved = 0.0
    if roll.colocated:  # the trainer's weights, gradients and optimizer stay resident
        p = tmem.peak
        reserved = p.weights + p.gradients + p.optimizer
    rmem = rollout_memory(m, roll, work, cluster.spec, assume, reserved)
    servers = max(1, roll.num_servers)
    tt = step_time(
        m,
        dataclasses.replace(train, gpus=max(train.gpus, train.model_parallel)),
        dataclasses.replace(roll, num_servers=servers),
        work,
        cluster.spec,
        rmem,
        assume,
        gpus_per_node=cluster.gpus_per_node,
    )
    plan = Plan(m, cluster, train, roll, work, tmem, rmem, tt)
    plan.problems = check_layout(m, cluster, train, roll, work)
    plan.problems += memory_problems(plan, assume)
    return plan


def _divisors_pow2(limit: int) -> list[int]:
    return [x for x in (1, 2, 4, 8, 16) if x <= limit]


def candidate_layouts(
    m: ModelShape, cluster: Cluster, train: TrainLayout, roll: RolloutLayout, work: Workload
) -> list[tuple[int, TrainLayout, RolloutLayout]]:
    """Layouts near the given one, each with a distance (how many settings differ)."""
    out: list[tuple[int, TrainLayout, RolloutLayout]] = []
    mbt_options = sorted({train.micro_batch_tokens, max(work.max_sequence_tokens, 1)})
    trains: list[tuple[int, TrainLayout]] = []
    for tp in _divisors_pow2(cluster.gpus_per_node):
        for pp in (1, 2, 4, 8):
            if m.num_layers % pp or train.gpus % (tp * pp) or train.gpus < tp * pp:
                continue
            for sp in {False, True} if tp > 1 else {False}:
                for rc in ("none", "selective", "full"):
                    for path in ("fused", "fused_lm_head", train.logits_path):
                        for dopt in (True, train.distributed_optimizer):
                            for mbt in mbt_options:
                                cand = dataclasses.replace(
                                    train,
                                    tp=tp,
                                    pp=pp,
                                    sequence_parallel=sp,
                                    recompute=rc,
                                    logits_path=path,
                                    distributed_optimizer=dopt,
                                    micro_batch_tokens=mbt,
                                )
                                d = sum(
                                    getattr(cand, k) != getattr(train, k)
                                    for k in (
                                        "tp",
                                        "pp",
                                        "sequence_parallel",
                                        "recompute",
                                        "logits_path",
                                        "distributed_optimizer",
                                        "micro_batch_tokens",
                                    )
                                )
                                trains.append((d, cand))
    trains = [
        (d + (cp != train.cp), dataclasses.replace(t, cp=cp))
        for d, t in trains
        for cp in sorted({1, 2, 4, train.cp})
        if train.gpus % (t.tp * t.pp * cp) == 0
    ]
    rolls: list[tuple[int, RolloutLayout]] = []
    gpus_r = (cluster.nodes if roll.colocated else cluster.rollout_nodes) * cluster.gpus_per_node
    for rtp in _divisors_pow2(cluster.gpus_per_node):
        for frac in sorted({roll.mem_fraction_static, 0.7, 0.8, 0.85}):
            servers = gpus_r // rtp if rtp != roll.tp else roll.num_servers
            if servers < 1:
                continue
            cand = dataclasses.replace(roll, tp=rtp, num_servers=servers, mem_fraction_static=frac)
            d = (
                (rtp != roll.tp)
                + (frac != roll.mem_fraction_static)
                + (servers != roll.num_servers)
            )
            rolls.append((d, cand))
    seen = set()
    for dt, t in trains:
        if t in seen:
            continue
        seen.add(t)
        for dr, r in rolls:
            out.append((dt + dr, t, r))
    return out


def nearest_fitting(
    m: ModelShape,
    cluster: Cluster,
    train: TrainLayout,
    roll: RolloutLayout,
    work: Workload,
    assume: Assumptions = Assumptions(),
) -> Plan | None:
    """The fitting layout that changes the fewest settings (ties: the fastest step)."""
    best: tuple[int, float, Plan] | None = None
    for d, t, r in candidate_layouts(m, cluster, train, roll, work):
        if best is not None and d > best[0]:
            continue
        plan = make_plan(m, cluster, t, r, work, assume)
        if not plan.fits:
            continue
        # among equally near layouts, one the trainer can run (no new CP) wins
        key = (d + 0.5 * (t.cp != train.cp), plan.time.total_s)
        if best is None or key < best[:2]:
            best = (key[0], plan.time.total_s, plan)
    return best[2] if best else None


def _layout_diff(old: Plan, new: Plan) -> list[str]:
    keys = {
        "tp": "parallel.tensor_model_parallel_size",
        "pp": "parallel.pipeline_model_parallel_size",
        "sequence_parallel": "parallel.sequence_parallel",
        "recompute": "model.recompute",
        "distributed_optimizer": "parallel.use_distributed_optimizer",
        "micro_batch_tokens": "parallel.micro_batch_tokens",
        "logits_path": "kernels (logits path)",
        "cp": "parallel.context_parallel_size",
    }
    out = [
        f"{name}={getattr(new.train, k)!r}"
        if k != "logits_path"
        else f"{name}: {getattr(new.train, k)} (kernels.fused_lm_head / kernels.mode)"
        for k, name in keys.items()
        if getattr(old.train, k) != getattr(new.train, k)
    ]
    if new.train.cp > 1 and old.train.cp != new.train.cp:
        out.append(
            "(CP needs model.transformer_impl: transformer_engine on GPUs; the trainer "
            "does not run CP yet)"
        )
    rkeys = {
        "tp": "rollout.sglang.tp_size",
        "num_servers": "rollout.sglang.num_servers",
        "mem_fraction_static": "rollout.sglang.mem_fraction_static",
    }
    out += [
        f"{name}={getattr(new.rollout, k)!r}"
        for k, name in rkeys.items()
        if getattr(old.rollout, k) != getattr(new.rollout, k)
    ]
    return out


# --------------------------------------------------------------------------- report
def _gib(x: float) -> str:
    return f"{x / GIB:7.2f} GiB"


def _batching_lines(
    est: MicroBatchEstimate | None, train: TrainLayout, assume: Assumptions
) -> list[str]:
    if est is None:
        return []
    how = (
        "packed sequences (parallel.pack_sequences: true)"
        if est.packed
        else "padded rows (parallel.pack_sequences: false)"
    )
    return [
        f"  batching: {how}, lengths rounded to x{train.seq_multiple}; padding "
        f"{est.padded_fraction:.1%} of the {est.tokens_run} tokens run for {est.sequences} "
        f"sequences per DP rank (assumed mix: prompts {assume.mean_prompt_tokens}, responses "
        f"lognormal mean {assume.mean_response_fraction:g} x max_new_tokens, log-sd "
        f"{assume.response_length_sigma:g}, capped)"
    ]


def format_plan(plan: Plan, assume: Assumptions = Assumptions()) -> str:
    m, c, g = plan.model, plan.cluster, plan.cluster.spec
    tm = plan.training
    lines = [
        f"model: {m.model_type}, {total_params(m) / 1e9:.2f} B parameters, "
        f"{m.num_layers} layers, hidden {m.hidden_size}, heads {m.num_heads}/{m.num_kv_heads}",
        f"cluster: {c.nodes} nodes x {c.gpus_per_node} {g.name} "
        f"({c.rollout_nodes} rollout nodes), usable {_gib(g.memory_bytes * assume.usable_memory_fraction)}"
        " per GPU",
        f"step: {plan.work.prompts_per_step} prompts x {plan.work.samples_per_prompt}, "
        f"up to {plan.work.max_sequence_tokens} tokens per sequence, "
        f"{plan.work.ppo_epochs} PPO epoch(s)",
        *(f"note: {n}" for n in plan.notes),
        "",
        f"training: {plan.train.gpus} GPUs, {plan.train.describe()}",
        f"  micro-batches per mini-batch and DP rank: {tm.microbatches}, in flight: {tm.in_flight}",
        *_batching_lines(tm.batching, plan.train, assume),
    ]
    if plan.train.cp > 1:
        lines.append(
            f"  context parallel CP{plan.train.cp}: {cp_tokens_per_gpu(plan.train)} tokens of each "
            f"micro-batch per GPU; ring attention sends "
            f"{cp_comm_bytes(m, plan.train, plan.work, assume) / GIB:.1f} GiB per GPU per step "
            f"({plan.time.cp_comm_s:.1f} s, counted in training, not overlapped)"
        )
    stages = (
        [("each GPU", tm.first)]
        if tm.last is tm.first
        else [("first stage", tm.first), ("last stage", tm.last)]
    )
    for label, s in stages:
        lines += [
            f"  {label}: {s.params / 1e9:.3f} B params per GPU",
            f"    weights (bf16)           {_gib(s.weights)}",
            f"    gradients (fp32)         {_gib(s.gradients)}",
            f"    {'optimizer (fp32 x3' + ('/DP)' if plan.train.distributed_optimizer else ')'):25}"
            f"{_gib(s.optimizer)}",
            f"    activations              {_gib(s.activations)}",
            f"    logits / entropy         {_gib(s.logits)}",
            *([f"    reference model (bf16)   {_gib(s.reference)}"] if s.reference else []),
            f"    total                    {_gib(s.total)}",
        ]
    lines.append(
        "  activations by recompute (first stage): "
        + ", ".join(f"{k} {v / GIB:.2f} GiB" for k, v in tm.activations_by_recompute.items())
    )
    lines.append(
        "  logits buffers by kernel path (last stage): "
        + ", ".join(f"{k} {v / GIB:.2f} GiB" for k, v in tm.logits_by_path.items())
    )
    r = plan.rollout_mem
    lines += [
        "",
        f"rollout: {plan.rollout.describe()}",
        f"  weights                    {_gib(r.weights)}",
        f"  KV pool                    {_gib(r.kv_pool)}  ({r.kv_per_token / KIB:.1f} KiB per token "
        f"per GPU; {r.concurrent_full_sequences} full-length sequences per server)",
        f"  KV for the whole batch at full length, all GPUs: {r.kv_for_batch / GIB:.1f} GiB",
        "",
        f"estimated step: {plan.time.total_s:8.1f} s = rollout {plan.time.rollout_s:.1f} s "
        f"(decode step {plan.time.decode_step_s * 1e3:.1f} ms at {plan.time.concurrency} "
        f"sequences per server) + weight sync {plan.time.weight_sync_s:.1f} s + training "
        f"{plan.time.training_s:.1f} s ({plan.time.train_flops / 1e15:.0f} PFLOP at "
        f"{assume.mfu_train:.0%} MFU)",
    ]
    return "\n".join(lines)


def plan_to_dict(plan: Plan) -> dict[str, Any]:
    tm = plan.training
    return {
        "fits": plan.fits,
        "problems": plan.problems,
        "notes": plan.notes,
        "params": total_params(plan.model),
        "train_layout": dataclasses.asdict(plan.train),
        "rollout_layout": dataclasses.asdict(plan.rollout),
        "training": {
            "first_stage": {**dataclasses.asdict(tm.first), "total": tm.first.total},
            "last_stage": {**dataclasses.asdict(tm.last), "total": tm.last.total},
            "activations_by_recompute": tm.activations_by_recompute,
            "logits_by_path": tm.logits_by_path,
            "microbatches": tm.microbatches,
            "batching": None
            if tm.batching is None
            else {
                **dataclasses.asdict(tm.batching),
                "padded_fraction": tm.batching.padded_fraction,
            },
        },
        "rollout": dataclasses.asdict(plan.rollout_mem),
        "time_s": {
            "rollout": plan.time.rollout_s,
            "weight_sync": plan.time.weight_sync_s,
            "training": plan.time.training_s,
            "context_parallel_comm": plan.time.cp_comm_s,
            "total": plan.time.total_s,
        },
    }


# --------------------------------------------------------------------------- CLI
def plan_config(
    cfg: Config,
    config_path: str | Path | None = None,
    nodes: int | None = None,
    gpus_per_node: int | None = None,
    gpu: str | None = None,
    assume: Assumptions = Assumptions(),
) -> Plan:
    m = shape_from_config(cfg, config_path)
    cluster = cluster_from_config(cfg, nodes, gpus_per_node, gpu)
    try:
        choices = resolved_choices(
            replace_sp_for_tp1(cfg), assume.te_version, cluster.spec.compute_capability
        )
    except ValueError as e:  # e.g. model.fp8 with model.transformer_impl: local
        raise ConfigError(str(e)) from None
    train, roll = layouts_from_config(cfg, cluster, assume, choices)
    plan = make_plan(m, cluster, train, roll, workload_from_config(cfg), assume)
    if cfg.rollout.engine != "sglang":
        plan.notes.append(
            f"rollout.engine = {cfg.rollout.engine}: the rollout figures assume SGLang servers "
            "laid out as rollout.sglang says"
        )
    if choices.build.precision.warning:
        plan.notes.append(f"on the cluster: {choices.build.precision.warning}")
    if train.fp8:
        plan.notes.append(
            f"model.fp8: {choices.build.precision.fp8_recipe} recipe on "
            f"{cluster.spec.name} with Transformer Engine {assume.te_version}; training "
            "weights counted in bf16 (an upper bound)"
        )
    return plan


def _positive_int(text: str) -> int:
    """argparse type: an integer >= 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} must be >= 1")
    return value


def _unit_fraction(text: str) -> float:
    """argparse type: a finite number in (0, 1] (a utilisation or a share)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not (math.isfinite(value) and 0.0 < value <= 1.0):
        raise argparse.ArgumentTypeError(f"{value} must be in (0, 1]")
    return value


def add_plan_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", help="YAML config file")
    parser.add_argument(
        "--nodes", type=_positive_int, default=None, help="nodes (default: slurm.nodes)"
    )
    parser.add_argument(
        "--gpus-per-node",
        type=_positive_int,
        default=None,
        help="GPUs per node (default: slurm.gpus_per_node)",
    )
    parser.add_argument(
        "--gpu", choices=sorted(GPU_SPECS), default=None, help="GPU type (default: slurm.gpu_type)"
    )
    parser.add_argument(
        "--override",
        "-o",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a dotted config key (repeatable)",
    )
    parser.add_argument(
        "--mfu",
        type=_unit_fraction,
        default=Assumptions.mfu_train,
        help="assumed training model-FLOPs utilisation",
    )
    parser.add_argument(
        "--mean-response-fraction",
        type=_unit_fraction,
        default=Assumptions.mean_response_fraction,
        help="assumed mean response length / rollout.max_new_tokens",
    )
    parser.add_argument("--json", action="store_true", help="print the plan as JSON")


def run_plan(args: argparse.Namespace) -> int:
    """0: the layout fits; 1: it does not (with the nearest one that does); 2: bad input."""
    try:
        cfg = load_config(args.config, getattr(args, "override", []))
        assume = Assumptions(
            mfu_train=getattr(args, "mfu", Assumptions.mfu_train),
            mean_response_fraction=getattr(
                args, "mean_response_fraction", Assumptions.mean_response_fraction
            ),
        )
        plan = plan_config(cfg, args.config, args.nodes, args.gpus_per_node, args.gpu, assume)
    except (ConfigError, ValueError, FileNotFoundError) as exc:
        print(f"archer plan: {exc}", file=sys.stderr)
        return 2
    if getattr(args, "json", False):
        out = plan_to_dict(plan)
        if not plan.fits:
            alt = nearest_fitting(
                plan.model, plan.cluster, plan.train, plan.rollout, plan.work, assume
            )
            out["suggestion"] = _layout_diff(plan, alt) if alt else None
        print(json.dumps(out, indent=2))
        return 0 if plan.fits else 1
    print(format_plan(plan, assume))
    if plan.fits:
        print("\nfits: yes")
        return 0
    print("\nDOES NOT FIT:", file=sys.stderr)
    for p in plan.problems:
        print(f"  - {p}", file=sys.stderr)
    alt = nearest_fitting(plan.model, plan.cluster, plan.train, plan.rollout, plan.work, assume)
    if alt is None:
        print(
            f"  no layout of {plan.cluster.nodes} nodes fits; try more nodes (--nodes)",
            file=sys.stderr,
        )
    else:
        print("  nearest layout that fits: " + ", ".join(_layout_diff(plan, alt)), file=sys.stderr)
        print(
            f"    (training peak {alt.training.peak.total / GIB:.1f} GiB per GPU, "
            f"step ~{alt.time.total_s:.0f} s)",
            file=sys.stderr,
        )
    return 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="archer plan", description=__doc__.splitlines()[0])
    add_plan_args(parser)
    return run_plan(parser.parse_args(argv))


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
