"""A `Plan` as text (`format_plan`), as JSON-ready data (`plan_to_dict`), and the
settings that differ between two plans, named by config key (`_layout_diff`).
"""

from __future__ import annotations

import dataclasses
from typing import Any

from archer_mcore.plan.formulas import active_params, cp_tokens_per_gpu, total_params
from archer_mcore.plan.memory import MicroBatchEstimate
from archer_mcore.plan.search import Plan
from archer_mcore.plan.specs import DEFAULT_ASSUMPTIONS, GIB, KIB, Assumptions, TrainLayout
from archer_mcore.plan.steptime import cp_comm_bytes, ep_comm_bytes


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
        "ep": "parallel.expert_model_parallel_size",
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


def _step_line(plan: Plan, assume: Assumptions) -> str:
    """The estimated step time and its phases (seconds)."""
    t = plan.time
    rollout = (
        f"rollout {t.rollout_s:.1f} s (decode step {t.decode_step_s * 1e3:.1f} ms at "
        f"{t.concurrency} sequences per server)"
    )
    training = (
        f"training {t.training_s:.1f} s ({t.train_flops / 1e15:.0f} PFLOP at "
        f"{assume.mfu_train:.0%} MFU)"
    )
    sync = f"weight sync {t.weight_sync_s:.1f} s"
    if t.overlapped:
        return (
            f"estimated step: {t.total_s:8.1f} s = max({rollout}, {training}) + {sync} "
            "(rollout.async_steps: the next batch generates while this one trains)"
        )
    return f"estimated step: {t.total_s:8.1f} s = {rollout} + {sync} + {training}"


def format_plan(plan: Plan, assume: Assumptions = DEFAULT_ASSUMPTIONS) -> str:
    m, c, g = plan.model, plan.cluster, plan.cluster.spec
    tm = plan.training
    active = f" ({active_params(m) / 1e9:.2f} B active per token)" if m.is_moe else ""
    experts = f", {m.num_experts} experts (top {m.moe_top_k})" if m.is_moe else ""
    lines = [
        f"model: {m.model_type}, {total_params(m) / 1e9:.2f} B parameters{active}{experts}, "
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
    if plan.train.ep > 1:
        lines.append(
            f"  expert parallel EP{plan.train.ep}: {m.num_experts // plan.train.ep} of the "
            f"{m.num_experts} experts per GPU, expert DP {plan.train.expert_dp}; the "
            f"all-to-alls send {ep_comm_bytes(m, plan.train, plan.work, assume) / GIB:.1f} GiB "
            f"per GPU per step ({plan.time.ep_comm_s:.1f} s, counted in training, not "
            "overlapped)"
        )
    stages = (
        [("each GPU", tm.first)]
        if tm.last is tm.first
        else [("first stage", tm.first), ("last stage", tm.last)]
    )
    for label, s in stages:
        of_experts = f" ({s.expert_params / 1e9:.3f} B in experts)" if s.expert_params else ""
        lines += [
            f"  {label}: {s.params / 1e9:.3f} B params per GPU{of_experts}",
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
        _step_line(plan, assume),
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
            "expert_parallel_comm": plan.time.ep_comm_s,
            "overlapped": plan.time.overlapped,
            "total": plan.time.total_s,
        },
    }
