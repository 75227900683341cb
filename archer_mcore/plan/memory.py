"""Per-GPU memory of the training side (per pipeline stage, with the micro-batches the
trainer's own batching code forms for an assumed length mix) and of the rollout side
(SGLang's weights and KV pool). Sizes in bytes.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Literal

from archer_mcore.model.hf_config import ModelShape
from archer_mcore.plan.formulas import (
    cp_ring_buffer_bytes,
    cp_tokens_per_gpu,
    embedding_activation_bytes_per_token,
    kv_bytes_per_token,
    layer_activation_bytes_per_token,
    logits_bytes,
    rollout_weight_bytes,
    stage_expert_params,
    stage_params,
)
from archer_mcore.plan.specs import (
    DEFAULT_ASSUMPTIONS,
    Assumptions,
    GpuSpec,
    RecomputeMode,
    RolloutLayout,
    TrainLayout,
    Workload,
)


@dataclass(frozen=True, kw_only=True)
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


@dataclass(kw_only=True)
class StageMemory:
    """Bytes on one GPU of one pipeline stage."""

    params: int
    weights: float
    gradients: float
    optimizer: float
    activations: float
    logits: float  # the log-prob path's peak (formulas.logits_bytes: its buffer list)
    reference: float = 0.0  # a frozen bf16 copy of the stage's weights, when a KL term needs it
    expert_params: int = 0  # of `params`, the routed experts' (MoE: split over EP)

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


@dataclass(kw_only=True)
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
    return MicroBatchEstimate(
        packed=pack,
        count=len(plan.rows),
        sequences=len(lengths),
        tokens=sum(lengths),
        tokens_run=sum(plan.tokens()),
    )


def microbatches_per_rank(layout: TrainLayout, work: Workload, assume: Assumptions) -> int:
    """Micro-batches one data-parallel rank runs per mini-batch (`microbatch_estimate`)."""
    return microbatch_estimate(layout, work, assume).count


def training_memory(
    m: ModelShape, layout: TrainLayout, work: Workload, assume: Assumptions = DEFAULT_ASSUMPTIONS
) -> TrainingMemory:
    tp, pp = layout.tp, layout.pp
    t = cp_tokens_per_gpu(layout)  # a micro-batch's tokens on one GPU (all of them at CP 1)
    nmb = microbatches_per_rank(layout, work, assume)
    in_flight = min(pp, nmb) if pp > 1 else 1
    seq = min(t, work.max_sequence_tokens)

    def acts(stage: str, recompute: RecomputeMode) -> float:
        per_layer = layer_activation_bytes_per_token(
            m,
            tp,
            sequence_parallel=layout.sequence_parallel,
            recompute=recompute,
            seq_len=seq,
            assume=assume,
        )
        layers = m.num_layers // pp
        per_mb = layers * per_layer
        if stage == "first":
            per_mb += embedding_activation_bytes_per_token(m, tp, layout.sequence_parallel, assume)
        held = t * per_mb * (in_flight if stage == "first" else 1)
        if recompute == "full":  # one layer's activations live again during its backward
            held += t * layer_activation_bytes_per_token(
                m,
                tp,
                sequence_parallel=layout.sequence_parallel,
                recompute="none",
                seq_len=seq,
                assume=assume,
            )
        return held + cp_ring_buffer_bytes(m, layout)

    grad_bytes, weight_bytes = 4.0, 2.0
    # megatron's distributed optimizer shards over the data-parallel group with CP; the
    # routed experts' states over the expert data-parallel group
    opt_bytes = 12.0 / (layout.dp * layout.cp) if layout.distributed_optimizer else 12.0
    expert_opt = 12.0 / max(layout.expert_dp, 1) if layout.distributed_optimizer else 12.0

    def stage(which: Literal["first", "last"]) -> StageMemory:
        experts = stage_expert_params(m, tp, pp, layout.ep)
        dense = stage_params(m, tp, pp, which)
        n = dense + experts
        has_logits = which == "last"
        return StageMemory(
            params=n,
            expert_params=experts,
            weights=n * weight_bytes,
            gradients=n * grad_bytes,
            optimizer=dense * opt_bytes + experts * expert_opt,
            activations=acts(which, layout.recompute),
            logits=logits_bytes(m, t, tp, path=layout.logits_path, assume=assume)
            if has_logits
            else 0.0,
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
            p: logits_bytes(m, t, tp, path=p, assume=assume)
            for p in ("unfused", "chunked", "fused", "fused_lm_head")
        },
        microbatches=nmb,
        in_flight=in_flight,
        batching=microbatch_estimate(layout, work, assume),
    )


@dataclass(kw_only=True)
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
    *,
    assume: Assumptions = DEFAULT_ASSUMPTIONS,
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
