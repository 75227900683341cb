"""Kernel 1: token entropy and sampled-token log-prob from logits, one pass, fp32 math.

For one row of logits z (length V) and temperature T, with x = z / T:

    m = max x,   S = sum_v e^(x_v - m),   B = sum_v e^(x_v - m) (x_v - m)   (B <= 0)
    lse = m + log S,   H = log S - B / S,   logprob = x_y - lse

The forward kernel streams the row once, keeping (m, S, B) online: when the running max
moves from m to m', S <- a S and B <- a (B + (m - m') S) with a = e^(m - m'). Shifting by
the max keeps H = log S - B/S a sum of two non-negative terms (no cancellation even for
logits of +-1e4).

The same partial statistics (m, S, B, x_y) of any vocabulary *slice* combine exactly
(`combine_partial_stats`): that is the vocab-parallel form. Each tensor-parallel rank
runs the kernel on its vocab shard, one all-reduce(MAX) of m [N] and one
all-reduce(SUM) of [3, N] combine them, and the backward needs only the per-row
(m, log S, H) that every rank then holds:

    d H / d z_v       = -(1/T) p_v (x_v - E_p[x])      with E_p[x] - m = log S - H
    d logprob / d z_v =  (1/T) (1[v = y] - p_v)         with p_v = e^(x_v - m - log S)

so each rank writes the gradient of its own shard with no logits-sized communication.
The torch reference is `archer_mcore.algo.entropy.entropy_and_logprob`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
import triton
import triton.language as tl
from archer_mcore.kernels._launch import require_launchable, tile_meta
from torch import Tensor

_BLOCK_V_GPU = 4096
_BLOCK_V_CPU = 64


@triton.jit
def _stats_kernel(
    z_ptr,  # [N, V] logits (row stride z_stride, unit column stride)
    tok_ptr,  # [N] int64 global token ids
    stats_ptr,  # [4, N] fp32 out: m, S, B, x_y
    z_stride,
    n_rows,
    V,  # columns read: the valid (non-padding) columns of the slice, >= 1
    vocab_start,
    inv_t,
    BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    z_row = z_ptr + row * z_stride
    target = tl.load(tok_ptr + row) - vocab_start
    offs = tl.arange(0, BLOCK_V)

    # First block peeled so that m starts finite (no -inf * 0 in the B update).
    mask = offs < V
    x = tl.load(z_row + offs, mask=mask, other=-float("inf")).to(tl.float32) * inv_t
    m = tl.max(x, 0)
    d = tl.where(mask, x - m, 0.0)  # x - m, 0 off the row (no -inf * 0)
    e = tl.where(mask, tl.exp(d), 0.0)
    s = tl.sum(e, 0)
    b = tl.sum(e * d, 0)
    xy = tl.sum(tl.where(mask & (offs == target), x, 0.0), 0)
    for start in range(BLOCK_V, V, BLOCK_V):
        cols = start + offs
        mask = cols < V
        x = tl.load(z_row + cols, mask=mask, other=-float("inf")).to(tl.float32) * inv_t
        m_new = tl.maximum(m, tl.max(x, 0))
        alpha = tl.exp(m - m_new)
        d = tl.where(mask, x - m_new, 0.0)
        e = tl.where(mask, tl.exp(d), 0.0)
        b = alpha * (b + (m - m_new) * s) + tl.sum(e * d, 0)
        s = alpha * s + tl.sum(e, 0)
        m = m_new
        xy += tl.sum(tl.where(mask & (cols == target), x, 0.0), 0)
    tl.store(stats_ptr + row, m)
    tl.store(stats_ptr + n_rows + row, s)
    tl.store(stats_ptr + 2 * n_rows + row, b)
    tl.store(stats_ptr + 3 * n_rows + row, xy)


@triton.jit
def _grad_kernel(
    z_ptr,  # [N, V] logits (may alias g_ptr: each element is read before it is written)
    g_ptr,  # [N, V] out: d loss / d z, dtype of g
    tok_ptr,  # [N] int64 global token ids
    row_ptr,  # [3, N] fp32: m, log S, H (global over the whole vocabulary)
    gh_ptr,  # [N] fp32 d loss / d H
    gl_ptr,  # [N] fp32 d loss / d logprob
    z_stride,
    g_stride,
    n_rows,
    V,  # columns written
    n_valid,  # columns < n_valid are real tokens; the rest (vocab padding) get 0
    vocab_start,
    inv_t,
    BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    z_row = z_ptr + row * z_stride
    g_row = g_ptr + row * g_stride
    target = tl.load(tok_ptr + row) - vocab_start
    m = tl.load(row_ptr + row)
    log_s = tl.load(row_ptr + n_rows + row)
    mean_sh = log_s - tl.load(row_ptr + 2 * n_rows + row)  # E_p[x] - m
    gh = tl.load(gh_ptr + row)
    gl = tl.load(gl_ptr + row)
    offs = tl.arange(0, BLOCK_V)
    for start in range(0, V, BLOCK_V):
        cols = start + offs
        mask = cols < V
        valid = cols < n_valid
        x = tl.load(z_row + cols, mask=valid, other=0.0).to(tl.float32)
        x_sh = tl.where(valid, x * inv_t - m, 0.0)  # 0 off the row: no overflow there
        p = tl.where(valid, tl.exp(x_sh - log_s), 0.0)
        g = -gh * p * (x_sh - mean_sh) - gl * p + tl.where(valid & (cols == target), gl, 0.0)
        tl.store(g_row + cols, (g * inv_t).to(g_ptr.dtype.element_ty), mask=mask)


def _meta(device: torch.device) -> dict[str, int]:
    return tile_meta(
        device, gpu={"BLOCK_V": _BLOCK_V_GPU, "num_warps": 16}, cpu={"BLOCK_V": _BLOCK_V_CPU}
    )


def valid_columns(width: int, vocab_start: int, vocab_size: int | None) -> int:
    """How many of a slice's `width` columns (global ids from `vocab_start`) are real
    tokens rather than Megatron's vocabulary padding (ids >= `vocab_size`)."""
    if vocab_size is None:
        return width
    return max(0, min(width, int(vocab_size) - int(vocab_start)))


def launch_stats(
    logits: Tensor,
    tokens: Tensor,
    out: Tensor,
    temperature: float,
    vocab_start: int = 0,
    vocab_size: int | None = None,
) -> Tensor:
    """Write the partial statistics of `logits` (a vocab slice starting at global id
    `vocab_start`) into `out` [4, N] fp32: rows m, S, B, x_y (x_y = 0 where the target is
    outside the slice). Columns with global id >= `vocab_size` are left out; a slice with
    none left gives (-inf, 0, 0, 0). Returns `out`."""
    n, v = logits.shape
    if logits.stride(-1) != 1:
        raise ValueError("logits must have unit stride along the vocabulary")
    if out.shape != (4, n) or out.dtype != torch.float32 or not out.is_contiguous():
        raise ValueError(
            f"out must be a contiguous fp32 [4, {n}] tensor, got {tuple(out.shape)} {out.dtype}"
        )
    if n == 0:
        return out
    v = valid_columns(v, vocab_start, vocab_size)
    if v == 0:
        out[0].fill_(float("-inf"))
        out[1:].zero_()
        return out
    require_launchable(_stats_kernel, logits.device)
    _stats_kernel[(n,)](
        logits,
        tokens,
        out,
        logits.stride(0),
        n,
        v,
        int(vocab_start),
        1.0 / float(temperature),
        **_meta(logits.device),
    )
    return out


def launch_grad(
    logits: Tensor,
    grad_out: Tensor,
    tokens: Tensor,
    row_stats: Tensor,
    grad_entropy: Tensor,
    grad_logprob: Tensor,
    temperature: float,
    vocab_start: int = 0,
    vocab_size: int | None = None,
) -> Tensor:
    """Write d loss / d logits of a vocab slice into `grad_out` (may be `logits` itself);
    0 in padding columns (global id >= `vocab_size`).

    row_stats: [3, N] fp32 rows m, log S, H over the *whole* vocabulary.
    grad_entropy, grad_logprob: [N] fp32 upstream gradients.
    """
    n, v = logits.shape
    if logits.stride(-1) != 1 or grad_out.stride(-1) != 1:
        raise ValueError("logits and grad_out must have unit stride along the vocabulary")
    if n == 0:
        return grad_out
    require_launchable(_grad_kernel, logits.device)
    _grad_kernel[(n,)](
        logits,
        grad_out,
        tokens,
        row_stats,
        grad_entropy,
        grad_logprob,
        logits.stride(0),
        grad_out.stride(0),
        n,
        v,
        valid_columns(v, vocab_start, vocab_size),
        int(vocab_start),
        1.0 / float(temperature),
        **_meta(logits.device),
    )
    return grad_out


@dataclass
class RowStats:
    """Per-row results over the whole vocabulary, each [N] fp32."""

    max: Tensor  # m = max_v z_v / T
    log_sum: Tensor  # log S = lse - m
    entropy: Tensor  # H, nats
    logprob: Tensor  # log p_y, nats

    def packed(self) -> Tensor:
        """[3, N] (m, log S, H), the layout `launch_grad` reads."""
        return torch.stack([self.max, self.log_sum, self.entropy]).contiguous()


def combine_partial_stats(partials: Tensor, group: dist.ProcessGroup | None = None) -> RowStats:
    """Combine partial statistics of disjoint vocab slices into whole-vocabulary results.

    Args:
        partials: [4, K, N] fp32, K slices of this process (rows m, S, B, x_y).
        group: if given, the slices of all ranks in the group are combined too (one
            all-reduce MAX of [N] and one all-reduce SUM of [3, N]).
    """
    # Slices with no valid column (all vocab padding) have m = -inf and S = 0; they get
    # weight 0 and no (m - M) S term, also when every slice of a rank is empty.
    m_k, s_k, b_k, xy_k = partials.unbind(0)
    m = m_k.amax(0)
    w = torch.where(s_k > 0, torch.exp(m_k - m), 0.0)
    s = (w * s_k).sum(0)
    b = (w * (b_k + torch.where(s_k > 0, m_k - m, 0.0) * s_k)).sum(0)
    xy = xy_k.sum(0)
    if group is not None and dist.get_world_size(group) > 1:
        m_global = m.clone()
        dist.all_reduce(m_global, op=dist.ReduceOp.MAX, group=group)
        w = torch.where(s > 0, torch.exp(m - m_global), 0.0)
        shift = torch.where(s > 0, m - m_global, 0.0)
        sums = torch.stack([w * s, w * (b + shift * s), xy])
        dist.all_reduce(sums, op=dist.ReduceOp.SUM, group=group)
        m, (s, b, xy) = m_global, sums.unbind(0)
    log_s = torch.log(s)
    return RowStats(max=m, log_sum=log_s, entropy=log_s - b / s, logprob=xy - m - log_s)


class _EntropyLogprobFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, tokens, temperature, vocab_start, vocab_size, group, inplace):
        n = logits.shape[0]
        partial = torch.empty(4, n, dtype=torch.float32, device=logits.device)
        launch_stats(logits, tokens, partial, temperature, vocab_start, vocab_size)
        stats = combine_partial_stats(partial.unsqueeze(1), group)
        ctx.save_for_backward(logits, tokens, stats.packed())
        ctx.temperature, ctx.vocab_start, ctx.vocab_size = temperature, vocab_start, vocab_size
        ctx.inplace = inplace
        return stats.entropy, stats.logprob

    @staticmethod
    def backward(ctx, grad_entropy, grad_logprob):
        logits, tokens, packed = ctx.saved_tensors
        n = logits.shape[0]
        zeros = torch.zeros(n, dtype=torch.float32, device=logits.device)
        gh = zeros if grad_entropy is None else grad_entropy.float().contiguous()
        gl = zeros if grad_logprob is None else grad_logprob.float().contiguous()
        # In place: each element is read before the same program overwrites it.
        grad = logits if ctx.inplace else torch.empty_like(logits)
        launch_grad(
            logits, grad, tokens, packed, gh, gl, ctx.temperature, ctx.vocab_start, ctx.vocab_size
        )
        return grad, None, None, None, None, None, None


def _check(logits: Tensor, tokens: Tensor, temperature: float) -> None:
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if logits.shape[:-1] != tokens.shape:
        raise ValueError(f"logits {tuple(logits.shape)} and tokens {tuple(tokens.shape)} differ")
    if logits.shape[-1] == 0:
        raise ValueError("logits have an empty vocabulary dimension")


def entropy_and_logprob(
    logits: Tensor, tokens: Tensor, temperature: float = 1.0, inplace_backward: bool = False
) -> tuple[Tensor, Tensor]:
    """Fused entropy of softmax(logits / T) and log-prob of `tokens`, in nats.

    Args:
        logits: [..., V] fp32 / bf16 / fp16 (math is fp32).
        tokens: [...] int token ids in [0, V).
        inplace_backward: see `vocab_parallel_entropy_and_logprob`.
    Returns:
        (entropy, logprob), each [...] fp32; differentiable w.r.t. logits (the gradient
        has the logits' dtype).
    """
    return vocab_parallel_entropy_and_logprob(
        logits, tokens, temperature, group=None, vocab_start=0, inplace_backward=inplace_backward
    )


def vocab_parallel_entropy_and_logprob(
    logits: Tensor,
    tokens: Tensor,
    temperature: float = 1.0,
    group: dist.ProcessGroup | None = None,
    vocab_start: int | None = None,
    vocab_size: int | None = None,
    inplace_backward: bool = False,
) -> tuple[Tensor, Tensor]:
    """Entropy and log-prob when the vocabulary is sharded over the ranks of `group`.

    Args:
        logits: [..., V_local] this rank's vocab shard of the logits.
        tokens: [...] global token ids (the same on every rank).
        group: the tensor-parallel group; None means a single, unsharded rank.
        vocab_start: global id of this shard's first column; default rank * V_local
            (Megatron's equal partition).
        vocab_size: the true vocabulary size; columns with global id >= it (Megatron's
            vocab padding) are left out of the softmax and get zero gradient.
        inplace_backward: write the logits gradient into the logits' own memory (as
            megatron's vocab-parallel cross entropy does), saving a logits-sized buffer.
            Only when nothing else reads those logits after this call's backward.
    Returns:
        (entropy, logprob) over the whole vocabulary, [...] fp32, equal on all ranks.
        The backward gives this shard's logits gradient and communicates nothing.
    """
    _check(logits, tokens, temperature)
    if vocab_size is not None and vocab_size < 1:
        raise ValueError(f"vocab_size must be >= 1, got {vocab_size}")
    if vocab_start is None:
        rank = dist.get_rank(group) if group is not None else 0
        vocab_start = rank * logits.shape[-1]
    lead = tokens.shape
    flat = logits.reshape(-1, logits.shape[-1])
    if flat.stride(-1) != 1:
        flat = flat.contiguous()
    toks = tokens.reshape(-1).to(torch.int64).contiguous()
    entropy, logprob = _EntropyLogprobFn.apply(
        flat, toks, float(temperature), int(vocab_start), vocab_size, group, inplace_backward
    )
    return entropy.reshape(lead), logprob.reshape(lead)
