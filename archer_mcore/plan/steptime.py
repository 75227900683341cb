"""The step-time model: rollout decode bounded by HBM bandwidth or compute, training
FLOPs at an assumed MFU (padding and the pipeline bubble included), ring-attention
traffic under CP, and the weight sync over one link. The phases add up, except under
`rollout.async_steps: 1` with disaggregated servers, where the next step's generation
overlaps this step's training (`StepTime.total_s`). Seconds; roofline-style, for sizing
a run, not a benchmark. benchmarks/plan_vs_published.py compares it with published
runs (docs/cluster.md, "The planner against published runs").
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from archer_mcore.model.hf_config import ModelShape
from archer_mcore.plan.formulas import cp_kv_bytes_per_token, matmul_params_per_token, total_params
from archer_mcore.plan.memory import RolloutMemory, microbatch_estimate, microbatches_per_rank
from archer_mcore.plan.specs import (
    DEFAULT_ASSUMPTIONS,
    Assumptions,
    GpuSpec,
    RolloutLayout,
    TrainLayout,
    Workload,
)


@dataclass(kw_only=True)
class StepTime:
    """One RL step's phases in seconds (`train_flops` in FLOP, `decode_step_s` for one
    decode step of `concurrency` sequences per server)."""

    rollout_s: float
    weight_sync_s: float
    training_s: float
    train_flops: float
    decode_step_s: float
    concurrency: int  # sequences decoding together per server
    cp_comm_s: float = 0.0  # ring-attention K/V traffic, part of training_s
    ep_comm_s: float = 0.0  # MoE expert-parallel all-to-all traffic, part of training_s
    overlapped: bool = False  # rollout runs while the trainer trains (async, disaggregated)

    @property
    def total_s(self) -> float:
        """Seconds per step in steady state. In series: rollout + weight sync +
        training. Overlapped (`rollout.async_steps: 1`, disaggregated): step k+1's
        generation starts when step k's training does, and the weight sync after step
        k waits for both (train/rollout_scheduler.py), so a step takes
        max(rollout, training) + weight sync."""
        if self.overlapped:
            return max(self.rollout_s, self.training_s) + self.weight_sync_s
        return self.rollout_s + self.weight_sync_s + self.training_s


def forward_flops_per_token(m: ModelShape, mean_context: float) -> float:
    """2 x matmul weights + causal attention (QK^T and AV over half the context)."""
    attn = 2 * 2 * m.num_layers * m.num_heads * m.head_dim * mean_context / 2
    return 2 * matmul_params_per_token(m) + attn


def cp_comm_bytes(
    m: ModelShape, train: TrainLayout, work: Workload, assume: Assumptions = DEFAULT_ASSUMPTIONS
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


def ep_comm_bytes(
    m: ModelShape, train: TrainLayout, work: Workload, assume: Assumptions = DEFAULT_ASSUMPTIONS
) -> float:
    """Bytes one GPU sends per RL step in megatron's expert-parallel all-to-alls (0 at
    EP 1 or for a dense model).

    Per MoE layer, a forward dispatches each of the GPU's tokens to its k experts (a
    bf16 hidden vector, 2h bytes, per expert) and combines the k results back: 2 x k x
    2h bytes per token, of which the share (EP - 1) / EP goes to other ranks (uniform
    routing). A backward sends the same again (the gradients of both). The GPU's
    tokens: the step's tokens (sequences x mean length) over the GPUs of one pipeline
    stage (DP x CP x TP: under TP the MoE layer sees its sequence-parallel shard), its
    layers L / PP; passes as in `cp_comm_bytes`."""
    ep = train.ep
    if ep <= 1 or not m.is_moe:
        return 0.0
    seq = min(assume.mean_prompt_tokens, work.max_prompt_tokens) + (
        assume.mean_response_fraction * work.max_new_tokens
    )
    tokens_per_gpu = work.sequences * seq / (train.dp * train.cp * train.tp)
    forwards = 1 + (1 if work.needs_reference else 0)
    forwards += work.ppo_epochs * (1 + (1 if train.recompute == "full" else 0))
    backwards = work.ppo_epochs
    per_token = 2 * m.moe_top_k * 2 * m.hidden_size * (ep - 1) / ep
    per_pass = (m.num_layers // train.pp) * tokens_per_gpu * per_token
    return per_pass * (forwards + backwards)


def step_time(
    m: ModelShape,
    train: TrainLayout,
    roll: RolloutLayout,
    work: Workload,
    gpu: GpuSpec,
    *,
    rmem: RolloutMemory,
    assume: Assumptions = DEFAULT_ASSUMPTIONS,
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
    # EP: the all-to-alls, not overlapped (megatron can overlap them with the shared
    # experts' or the other micro-batch's compute; Qwen3-MoE has no shared experts).
    # NVLink while the TP x EP ranks of an expert group share a node.
    ep_comm_s = 0.0
    if train.ep > 1:
        ep_link = (
            gpu.nvlink_bytes_per_s
            if train.tp * train.ep <= gpus_per_node
            else gpu.network_bytes_per_s
        )
        ep_comm_s = ep_comm_bytes(m, train, work, assume) / ep_link
        training_s += ep_comm_s
    # Weight sync: the bf16 weights leave the trainer through one link (the bucketed
    # broadcast from the gathering rank; NVLink/IPC when colocated, the NIC otherwise).
    link = gpu.nvlink_bytes_per_s if roll.colocated else gpu.network_bytes_per_s
    sync_s = 2 * total_params(m) / link
    return StepTime(
        rollout_s=rollout_s,
        weight_sync_s=sync_s,
        training_s=training_s,
        train_flops=flops,
        decode_step_s=decode_step,
        concurrency=conc,
        cp_comm_s=cp_comm_s,
        ep_comm_s=ep_comm_s,
        overlapped=roll.overlaps_training,
    )
