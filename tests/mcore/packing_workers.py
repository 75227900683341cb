"""Code that runs inside the spawned gloo processes of tests/mcore/test_packing.py.

`entry` registers the `packing` task with `mcore_workers` and runs it there (same
process setup as the other megatron tests).
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import mcore_workers
import torch
import torch.distributed as dist


def entry(
    rank: int, world: int, port: int, task: str, payload: dict[str, Any], result_path: str
) -> None:
    mcore_workers.TASKS["packing"] = packing
    mcore_workers.entry(rank, world, port, task, payload, result_path)


def _policy_cfg(payload: dict[str, Any], budget: int, pack: bool, sp: bool, fused: bool):
    from archer_mcore.actor.policy_config import PolicyConfig
    from archer_mcore.config import KernelsConfig, OptimizerConfig, ParallelConfig

    return PolicyConfig(
        parallel=ParallelConfig(
            tensor_model_parallel_size=payload["tp"],
            pipeline_model_parallel_size=payload["pp"],
            sequence_parallel=sp,
            micro_batch_tokens=budget,
            pack_sequences=pack,
        ),
        optimizer=OptimizerConfig(**payload["optim"]),
        kernels=KernelsConfig(mode="torch", fused_lm_head=fused),
        temperature=payload["temperature"],
        with_reference=False,
    )


def _run(payload: dict[str, Any], budget: int, pack: bool, sp: bool, fused: bool):
    """Build a policy, score the batch, take one optimizer step. Returns its results
    (log-probs, entropies, metrics; on this rank: gradients and updated weights by
    megatron parameter name) and the shapes of its micro-batches."""
    from archer_mcore.actor.policy import MegatronPolicy
    from archer_mcore.config import config_from_dict

    policy = MegatronPolicy.from_hf(
        payload["hf_dir"], _policy_cfg(payload, budget, pack, sp, fused)
    )
    batch = mcore_workers._policy_batch(payload["batch"])
    mbs = policy._microbatches(batch)
    logp, ent = policy.compute_logprobs(batch)
    metrics = policy.train_step(batch, config_from_dict({"algorithm": payload["loss"]}).algorithm)
    grads, weights = {}, {}
    for name, p in policy.model.module.named_parameters():
        grads[name] = p.main_grad.detach().clone().float()
        weights[name] = p.detach().clone().float()
    shapes = [[*mb.shape, len(mb.extras["rows"])] for mb in mbs]
    core = _core_attention_check(policy)
    # the same policy with parallel.pack_sequences flipped: its micro-batches
    par = policy.cfg.parallel
    policy.cfg = replace(policy.cfg, parallel=replace(par, pack_sequences=not par.pack_sequences))
    flipped = [[*mb.shape, len(mb.extras["rows"])] for mb in policy._microbatches(batch)]
    return logp, ent, metrics, grads, weights, {"shapes": shapes, "flipped": flipped, "core": core}


def block_diagonal_causal_mask(cu_seqlens: torch.Tensor, total: int) -> torch.Tensor:
    """[1, 1, total, total] bool, True where attention is not allowed (megatron's
    convention): key j is visible from query i iff j <= i in the same segment."""
    idx = torch.arange(total)
    seg = torch.searchsorted(cu_seqlens[1:].long(), idx, right=True)
    allowed = (seg.unsqueeze(0) == seg.unsqueeze(1)) & (idx.unsqueeze(0) <= idx.unsqueeze(1))
    return (~allowed).view(1, 1, total, total)


def _core_attention_check(policy) -> dict[str, float]:
    """The local spec's packed core attention (per segment) against megatron's own
    DotProductAttention over the whole packed row with the explicit block-diagonal
    causal mask; and how far plain causal attention over the row is from it."""
    from megatron.core.packed_seq_params import PackedSeqParams
    from megatron.core.transformer.dot_product_attention import DotProductAttention
    from megatron.core.transformer.enums import AttnMaskType

    attn = policy.unwrapped().decoder.layers[0].self_attention.core_attention
    g = torch.Generator().manual_seed(3)
    cu = torch.tensor([0, 5, 6, 13, 16], dtype=torch.int32)  # lengths 5, 1, 7, 3
    t, hn = 16, attn.hidden_size_per_attention_head
    q = torch.randn(t, attn.num_attention_heads_per_partition, hn, generator=g)
    k = torch.randn(t, attn.num_query_groups_per_partition, hn, generator=g)
    v = torch.randn(t, attn.num_query_groups_per_partition, hn, generator=g)
    psp = PackedSeqParams(
        qkv_format="thd", cu_seqlens_q=cu, cu_seqlens_kv=cu, max_seqlen_q=7, max_seqlen_kv=7
    )
    with torch.no_grad():
        seg = attn(q, k, v, None, attn_mask_type=AttnMaskType.causal, packed_seq_params=psp)
        row = (q.unsqueeze(1), k.unsqueeze(1), v.unsqueeze(1))
        ref = DotProductAttention.forward(
            attn, *row, block_diagonal_causal_mask(cu, t), AttnMaskType.causal
        )
        causal = DotProductAttention.forward(attn, *row, None, AttnMaskType.causal)
    return {
        "type": type(attn).__name__,
        "vs_mask": (seg - ref).abs().max().item(),
        "causal_vs_mask": (causal - ref).abs().max().item(),
    }


def packing(payload: dict[str, Any]) -> dict[str, Any]:
    """The sequences one by one (padded rows, a budget of 1 token: one row per
    micro-batch) against packed micro-batches at each budget in payload["budgets"]
    (and the variants in payload["variants"]): max differences over all ranks."""
    ref = _run(payload, 1, False, False, False)
    ref_logp, ref_ent, ref_metrics, ref_grads, ref_weights, ref_shapes = ref
    out: dict[str, Any] = {"reference_shapes": ref_shapes["shapes"], "runs": {}}
    for budget, sp, fused in payload["runs"]:
        logp, ent, metrics, grads, weights, shapes = _run(payload, budget, True, sp, fused)
        grad_scale = max(g.abs().max().item() for g in ref_grads.values())
        res = {
            "shapes": shapes["shapes"],
            "unpacked_shapes": shapes["flipped"],
            "logprob": (logp - ref_logp).abs().max().item(),
            "entropy": (ent - ref_ent).abs().max().item(),
            "loss": abs(metrics["loss"] - ref_metrics["loss"]),
            "grad_norm": abs(metrics["grad_norm"] - ref_metrics["grad_norm"]),
            "grad": mcore_workers._max_over_world(
                max((grads[n] - ref_grads[n]).abs().max().item() for n in grads)
            ),
            "grad_scale": mcore_workers._max_over_world(grad_scale),
            "weights": mcore_workers._max_over_world(
                max((weights[n] - ref_weights[n]).abs().max().item() for n in weights)
            ),
        }
        out["runs"][f"{budget}-sp{int(sp)}-fused{int(fused)}"] = res
    out["core_attention"] = ref_shapes["core"]
    out["ref_grad_norm"] = ref_metrics["grad_norm"]
    out["ref_logp_nonzero"] = int((ref_logp != 0).sum())
    out["world"] = dist.get_world_size()
    return out
