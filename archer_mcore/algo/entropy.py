"""Token entropy and sampled-token log-prob from logits: the one torch reference.

Both come from one pass over each row's softmax p = softmax(z / T). The vocabulary
may be sharded across tensor-parallel ranks: each rank holds logits for vocabulary
ids [vocab_start, vocab_start + V_local); unsharded is the case of one rank holding
everything. With s = z / T the full softmax is assembled from three reductions over
the group, never from gathered logits:

    m       = max_v s_v                         (all-reduce MAX)
    S       = sum_v exp(s_v - m)                (all-reduce SUM)
    W       = sum_v exp(s_v - m) (s_v - m)      (same SUM call)
    s_y - m = the target's shifted logit         (same SUM call; one rank holds it)

    logprob = (s_y - m) - log S,      entropy = log S - W / S.

Working on s - m keeps H from cancelling large numbers. The backward needs no
communication: with p_v = exp(s_v - m) / S (global quantities already known on every
rank), dH/ds_v = -p_v (s_v - E_p[s]) and dlogp/ds_v = 1[v = y] - p_v, so each rank
differentiates its own columns. Upstream gradients are the same on every TP rank (the
loss is replicated across TP), as in megatron's own vocab-parallel cross entropy.

The math is fp32 for fp32/bf16/fp16 logits (fp64 for fp64 logits, so that the
reference can be gradient-checked). Columns at or beyond `vocab_size` (megatron's
vocab padding) are excluded. Rows are processed in chunks, in the forward and again
in the backward, so the extra memory is O(chunk_rows x V_local) however many tokens
there are. This is the reference the fused Triton kernels (`archer_mcore.kernels`)
must match; it only needs torch.distributed, nothing of megatron.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor


def _math_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _shifted(z: Tensor, valid: Tensor | None, temperature: float, dtype: torch.dtype) -> Tensor:
    """z / T in the math dtype, padding columns -inf: a new [rows, V_local] tensor
    (never `z` itself, so the caller may modify it in place)."""
    s = z.to(dtype, copy=True).div_(temperature)
    return s if valid is None else s.masked_fill_(~valid, float("-inf"))


def _all_reduce(t: Tensor, op: dist.ReduceOp, group: dist.ProcessGroup | None, tp: int) -> Tensor:
    if tp > 1:
        dist.all_reduce(t, op=op, group=group)
    return t


class _VocabParallelEntropyLogprob(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx, logits, tokens, vocab_start, vocab_size, group, temperature, chunk_rows, inplace
    ):
        n, v_local = logits.shape
        tp = dist.get_world_size(group) if group is not None and dist.is_initialized() else 1
        dtype = _math_dtype(logits.dtype)
        cols = torch.arange(vocab_start, vocab_start + v_local, device=logits.device)
        valid = None if vocab_start + v_local <= vocab_size else (cols < vocab_size).unsqueeze(0)
        local = tokens - vocab_start
        in_shard = (local >= 0) & (local < v_local)
        local = local.clamp(0, v_local - 1)

        max_all = torch.empty(n, dtype=dtype, device=logits.device)
        stats = torch.empty(3, n, dtype=dtype, device=logits.device)  # S, W, s_y - m
        for lo in range(0, n, chunk_rows):
            hi = min(lo + chunk_rows, n)
            s = _shifted(logits[lo:hi], valid, temperature, dtype)
            max_all[lo:hi] = s.amax(-1)
            del s  # before the next chunk's is made
        _all_reduce(max_all, dist.ReduceOp.MAX, group, tp)
        for lo in range(0, n, chunk_rows):
            hi = min(lo + chunk_rows, n)
            # In-place steps, the same values as the out-of-place expressions: scratch
            # of two fp32 [rows, V_local] tensors and a mask.
            sh = _shifted(logits[lo:hi], valid, temperature, dtype)
            sh.sub_(max_all[lo:hi].unsqueeze(-1))
            e = torch.exp(sh)
            stats[0, lo:hi] = e.sum(-1)
            zero = (e > 0).logical_not_()  # where(e > 0, e * sh, 0), NaN included
            stats[1, lo:hi] = e.mul_(sh).masked_fill_(zero, 0.0).sum(-1)
            del e, zero
            s_y = sh.gather(-1, local[lo:hi].unsqueeze(-1)).squeeze(-1)
            stats[2, lo:hi] = torch.where(in_shard[lo:hi], s_y, torch.zeros_like(s_y))
            del sh
        _all_reduce(stats, dist.ReduceOp.SUM, group, tp)
        lse_sh = torch.log(stats[0])
        entropy = lse_sh - stats[1] / stats[0]
        logprob = stats[2] - lse_sh

        ctx.save_for_backward(logits, local, in_shard, max_all, lse_sh, entropy)
        ctx.valid = valid
        ctx.temperature = temperature
        ctx.chunk_rows = chunk_rows
        ctx.inplace = inplace
        return entropy, logprob

    @staticmethod
    def backward(ctx, grad_entropy, grad_logprob):
        logits, local, in_shard, max_all, lse_sh, entropy = ctx.saved_tensors
        t, chunk, valid = ctx.temperature, ctx.chunk_rows, ctx.valid
        dtype = max_all.dtype
        n = logits.shape[0]
        g_ent = torch.zeros_like(entropy) if grad_entropy is None else grad_entropy.to(dtype)
        g_lp = torch.zeros_like(entropy) if grad_logprob is None else grad_logprob.to(dtype)
        # In place: each chunk of rows is read (sh) before its gradient overwrites it.
        grad = logits if ctx.inplace else torch.empty_like(logits)
        for lo in range(0, n, chunk):
            hi = min(lo + chunk, n)
            # g = -gh p (s - E_p[s]) - gl p + gl 1[v = y], then / T; in-place steps with
            # the values of those expressions: scratch of three fp32 [rows, V_local]
            # tensors and a mask.
            sh = _shifted(logits[lo:hi], valid, t, dtype)
            sh.sub_(max_all[lo:hi].unsqueeze(-1))
            p = (sh - lse_sh[lo:hi].unsqueeze(-1)).exp_()
            # s - E_p[s] = sh - (lse_sh - H); zero where p = 0 (padding) to avoid 0 * -inf.
            centred = sh.sub_((lse_sh[lo:hi] - entropy[lo:hi]).unsqueeze(-1))
            centred.masked_fill_((p > 0).logical_not_(), 0.0)
            gh = g_ent[lo:hi].unsqueeze(-1)
            gl = g_lp[lo:hi].unsqueeze(-1)
            g = (p * -gh).mul_(centred)  # (-gh p) centred
            del centred, sh
            g.sub_(p.mul_(gl))  # - gl p
            del p
            hit = gl * in_shard[lo:hi].unsqueeze(-1).to(dtype)  # 1[v = y] on the owning rank
            g.scatter_add_(-1, local[lo:hi].unsqueeze(-1), hit)
            grad[lo:hi] = g.div_(t).to(logits.dtype)
            del g
        return grad, None, None, None, None, None, None, None


def vocab_parallel_entropy_and_logprob(
    logits_shard: Tensor,
    tokens: Tensor,
    vocab_start: int,
    tp_group: dist.ProcessGroup | None,
    *,
    temperature: float = 1.0,
    vocab_size: int | None = None,
    chunk_rows: int = 4096,
    inplace_backward: bool = False,
) -> tuple[Tensor, Tensor]:
    """Entropy and sampled-token log-prob of softmax(logits / T) over a TP-sharded vocab.

    Args:
        logits_shard: [N, V_local] this rank's columns (any float dtype).
        tokens: [N] int64 *global* token ids.
        vocab_start: first global id of this rank's columns.
        tp_group: the tensor-parallel group (None: unsharded, no communication).
        temperature: sampling temperature T > 0.
        vocab_size: true vocabulary size; ids >= it (padding) are excluded.
        chunk_rows: rows per chunk (bounds scratch memory).
        inplace_backward: write the gradient into `logits_shard`'s own memory instead
            of a new [N, V_local] buffer (as the Triton kernel's option of that name and
            megatron's vocab-parallel cross entropy do). Only when nothing reads those
            logits after this call's backward (e.g. a matmul output used only here:
            the matmul's backward needs its inputs, not its output).
    Returns:
        (entropy [N], logprob [N]) in nats, fp32 (fp64 for fp64 logits); the same on all
        TP ranks; differentiable w.r.t. `logits_shard`.
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if logits_shard.dim() != 2 or tokens.shape != logits_shard.shape[:1]:
        raise ValueError(
            f"logits_shard {tuple(logits_shard.shape)} must be [N, V_local] with tokens [N], got {tuple(tokens.shape)}"
        )
    vocab_size = 1 << 62 if vocab_size is None else int(vocab_size)
    return _VocabParallelEntropyLogprob.apply(
        logits_shard,
        tokens.long(),
        int(vocab_start),
        vocab_size,
        tp_group,
        float(temperature),
        max(1, int(chunk_rows)),
        bool(inplace_backward),
    )


def entropy_and_logprob(
    logits: Tensor, tokens: Tensor, temperature: float = 1.0, chunk_rows: int = 2048
) -> tuple[Tensor, Tensor]:
    """Entropy of softmax(logits / T) and the log-prob of `tokens` under it (unsharded).

    Args:
        logits: [..., V] any float dtype.
        tokens: [...] int64 token ids in [0, V).
        temperature: the rollout sampling temperature T (> 0).
        chunk_rows: rows processed at once; bounds the fp32 scratch memory.
    Returns:
        (entropy, logprob), each [...] float32 (float64 for float64 logits), in nats.
        Differentiable w.r.t. logits.
    """
    if logits.shape[:-1] != tokens.shape:
        raise ValueError(f"logits {tuple(logits.shape)} and tokens {tuple(tokens.shape)} differ")
    lead = tokens.shape
    entropy, logprob = vocab_parallel_entropy_and_logprob(
        logits.reshape(-1, logits.shape[-1]),
        tokens.reshape(-1),
        vocab_start=0,
        tp_group=None,
        temperature=temperature,
        chunk_rows=chunk_rows,
    )
    return entropy.reshape(lead), logprob.reshape(lead)
