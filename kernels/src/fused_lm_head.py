"""Kernel 2: log-prob and entropy straight from hidden states and the output weight.

logits = hidden @ weight^T / T is never materialised in full:

- forward: one Triton kernel multiplies a [BLOCK_M, H] tile of hidden states by
  [BLOCK_V, H] tiles of the (vocab-sharded) weight and folds each [BLOCK_M, BLOCK_V]
  logits tile into the online (m, S, B, x_y) statistics of kernel 1 (see
  `entropy_logprob`). The vocabulary is split over a second grid axis so that there are
  enough programs; the splits' statistics, and the tensor-parallel ranks' ones, combine
  with `combine_partial_stats`.
- backward: the vocabulary is walked in chunks of `chunk_cols` columns: a Triton kernel
  recomputes the chunk's logits tile by tile (fp32 accumulation, as in the forward) and
  writes d loss / d logits into a [N, chunk_cols] buffer, and two matmuls give
  grad_hidden += G @ W_c and grad_weight[c] = G^T @ hidden. Peak extra memory is that
  buffer plus an fp32 [N, H] accumulator.
- `recompute="cublas"` makes the logits tiles differently: one cuBLAS matmul per vocab
  chunk into an fp32 [N, chunk_cols] buffer, then kernel 1's statistics / gradient
  kernels on it. Same results; which is faster depends on how close Triton's tl.dot
  gets to cuBLAS on the GPU at hand (benchmarks/kernel_bench.py reports both).

Tensor parallelism: with `group`, `weight` is this rank's [V_local, H] shard (Megatron's
ColumnParallelLinear output layer, rows vocab_start .. vocab_start + V_local). The
statistics combine with one small all-reduce; grad_hidden is all-reduced over the group
(the hidden states are replicated over it), so do not also wrap them in Megatron's
copy_to_tensor_model_parallel_region. Sequence parallelism is not handled here.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
import triton
import triton.language as tl
from archer_mcore.kernels._launch import require_launchable
from archer_mcore.kernels.entropy_logprob import (
    combine_partial_stats,
    launch_grad,
    launch_stats,
    valid_columns,
)
from torch import Tensor

_CPU_META = {"BLOCK_M": 16, "BLOCK_V": 32, "BLOCK_K": 16, "GROUP_M": 2}
_SPLIT_QUANTUM = 256  # vocab split sizes are multiples of every BLOCK_V used


@triton.jit
def _logits_tile(
    h_ptr, w_ptr, rows64, row_mask, cols64, col_mask, H, h_stride, w_stride,
    UPCAST: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    """hidden[rows] @ weight[cols]^T as an fp32 [BLOCK_M, BLOCK_V] tile (0 off the mask)."""
    acc = tl.zeros([BLOCK_M, BLOCK_V], tl.float32)
    for k0 in range(0, H, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        k_mask = ks < H
        a = tl.load(
            h_ptr + rows64[:, None] * h_stride + ks[None, :],
            mask=row_mask[:, None] & k_mask[None, :],
            other=0.0,
        )
        w = tl.load(
            w_ptr + cols64[:, None] * w_stride + ks[None, :],
            mask=col_mask[:, None] & k_mask[None, :],
            other=0.0,
        )
        if UPCAST:
            a = a.to(tl.float32)
            w = w.to(tl.float32)
        acc = tl.dot(a, tl.trans(w), acc, input_precision=PRECISION)
    return acc


@triton.jit
def _grouped_pid(pid, n_row_blocks, n_col_blocks, GROUP_M: tl.constexpr):
    """Map a 1-D program id to (row block, column block) in groups of GROUP_M row
    blocks: the programs running at once then share a few hidden-state panels and a
    few weight panels, which stay in L2 (the hidden panel of one row block alone is
    BLOCK_M x H, 1.3 MB at H = 5120)."""
    per_group = GROUP_M * n_col_blocks
    first_m = (pid // per_group) * GROUP_M
    group_m = tl.minimum(n_row_blocks - first_m, GROUP_M)
    in_group = pid % per_group
    return first_m + in_group % group_m, in_group // group_m


@triton.jit
def _lm_head_stats_kernel(
    h_ptr,  # [N, H] hidden states
    w_ptr,  # [V, H] output weight (shard)
    tok_ptr,  # [N] int64 global token ids
    stats_ptr,  # [4, K, N] fp32 out: m, S, B, x_y per vocab split
    n_rows,
    V,  # valid (non-padding) rows of the weight shard, >= 1
    H,
    vocab_start,
    inv_t,
    split_size,
    n_splits,
    h_stride,
    w_stride,
    UPCAST: tl.constexpr,  # bf16 dot under the interpreter: compute in fp32
    PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_V: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    pid_m, pid_s = _grouped_pid(tl.program_id(0), tl.cdiv(n_rows, BLOCK_M), n_splits, GROUP_M)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_mask = rows < n_rows
    rows64 = rows.to(tl.int64)
    target = tl.load(tok_ptr + rows64, mask=row_mask, other=-1) - vocab_start
    v_begin = pid_s * split_size
    v_end = tl.minimum(v_begin + split_size, V)

    m = tl.full([BLOCK_M], -float("inf"), tl.float32)
    s = tl.zeros([BLOCK_M], tl.float32)
    b = tl.zeros([BLOCK_M], tl.float32)
    xy = tl.zeros([BLOCK_M], tl.float32)
    for v0 in range(v_begin, v_end, BLOCK_V):
        cols = v0 + tl.arange(0, BLOCK_V)
        col_mask = cols < v_end
        cols64 = cols.to(tl.int64)
        acc = _logits_tile(
            h_ptr, w_ptr, rows64, row_mask, cols64, col_mask, H, h_stride, w_stride,
            UPCAST, PRECISION, BLOCK_M, BLOCK_V, BLOCK_K,
        )  # fmt: skip
        x = tl.where(col_mask[None, :], acc * inv_t, -float("inf"))
        m_new = tl.maximum(m, tl.max(x, 1))
        alpha = tl.exp(m - m_new)
        d = tl.where(col_mask[None, :], x - m_new[:, None], 0.0)
        e = tl.where(col_mask[None, :], tl.exp(d), 0.0)
        # s == 0 only before the first tile, where m = -inf would make (m - m_new) * s NaN.
        shift = tl.where(s > 0.0, m - m_new, 0.0)
        b = alpha * (b + shift * s) + tl.sum(e * d, 1)
        s = alpha * s + tl.sum(e, 1)
        m = m_new
        hit = col_mask[None, :] & (cols[None, :] == target[:, None])
        xy += tl.sum(tl.where(hit, x, 0.0), 1)
    plane = n_splits * n_rows
    base = stats_ptr + pid_s * n_rows + rows64
    tl.store(base, m, mask=row_mask)
    tl.store(base + plane, s, mask=row_mask)
    tl.store(base + 2 * plane, b, mask=row_mask)
    tl.store(base + 3 * plane, xy, mask=row_mask)


@triton.jit
def _lm_head_grad_kernel(
    h_ptr,  # [N, H] hidden states
    w_ptr,  # [C, H] the weight rows of this vocab chunk
    tok_ptr,  # [N] int64 global token ids
    row_ptr,  # [3, N] fp32: m, log S, H over the whole vocabulary
    gh_ptr,  # [N] fp32 d loss / d entropy
    gl_ptr,  # [N] fp32 d loss / d logprob
    g_ptr,  # [N, C] out: d loss / d logits of the chunk, dtype of g
    n_rows,
    C,  # columns written
    C_valid,  # columns < C_valid are real tokens; the rest (vocab padding) get 0
    H,
    col_start,  # global token id of the chunk's first column
    inv_t,
    h_stride,
    w_stride,
    g_stride,
    C_TUNE,  # not read: the autotune key for C (tune_bucket(C))
    UPCAST: tl.constexpr,
    PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_V: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    pid_m, pid_v = _grouped_pid(
        tl.program_id(0), tl.cdiv(n_rows, BLOCK_M), tl.cdiv(C, BLOCK_V), GROUP_M
    )
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_v * BLOCK_V + tl.arange(0, BLOCK_V)
    row_mask = rows < n_rows
    col_mask = cols < C
    valid = row_mask[:, None] & (cols < C_valid)[None, :]
    rows64 = rows.to(tl.int64)
    cols64 = cols.to(tl.int64)
    acc = _logits_tile(
        h_ptr, w_ptr, rows64, row_mask, cols64, col_mask, H, h_stride, w_stride,
        UPCAST, PRECISION, BLOCK_M, BLOCK_V, BLOCK_K,
    )  # fmt: skip
    target = tl.load(tok_ptr + rows64, mask=row_mask, other=-1) - col_start
    m = tl.load(row_ptr + rows64, mask=row_mask, other=0.0)
    log_s = tl.load(row_ptr + n_rows + rows64, mask=row_mask, other=0.0)
    mean_sh = log_s - tl.load(row_ptr + 2 * n_rows + rows64, mask=row_mask, other=0.0)
    gh = tl.load(gh_ptr + rows64, mask=row_mask, other=0.0)
    gl = tl.load(gl_ptr + rows64, mask=row_mask, other=0.0)
    mask = row_mask[:, None] & col_mask[None, :]
    x_sh = tl.where(valid, acc * inv_t - m[:, None], 0.0)
    p = tl.where(valid, tl.exp(x_sh - log_s[:, None]), 0.0)
    g = -gh[:, None] * p * (x_sh - mean_sh[:, None]) - gl[:, None] * p
    g += tl.where(valid & (cols[None, :] == target[:, None]), gl[:, None], 0.0)
    out = g_ptr + rows64[:, None] * g_stride + cols64[None, :]
    tl.store(out, (g * inv_t).to(g_ptr.dtype.element_ty), mask=mask)


# GPU tile configurations, autotuned per (H, V) on first use. Every BLOCK_V divides
# _SPLIT_QUANTUM, so vocab splits never cut a tile. Not yet tuned on hardware.
_GPU_CONFIGS = [
    triton.Config(
        {"BLOCK_M": 128, "BLOCK_V": 128, "BLOCK_K": 64, "GROUP_M": 8}, num_warps=8, num_stages=3
    ),
    triton.Config(
        {"BLOCK_M": 128, "BLOCK_V": 256, "BLOCK_K": 64, "GROUP_M": 8}, num_warps=8, num_stages=3
    ),
    triton.Config(
        {"BLOCK_M": 256, "BLOCK_V": 128, "BLOCK_K": 64, "GROUP_M": 4}, num_warps=8, num_stages=3
    ),
    triton.Config(
        {"BLOCK_M": 64, "BLOCK_V": 128, "BLOCK_K": 64, "GROUP_M": 16}, num_warps=4, num_stages=4
    ),
]
_GPU_BLOCK_M_ESTIMATE = 128  # for choosing the number of vocab splits before tuning
_stats_tuned = triton.autotune(configs=_GPU_CONFIGS, key=["H", "V"])(_lm_head_stats_kernel)
_grad_tuned = triton.autotune(configs=_GPU_CONFIGS, key=["H", "C_TUNE"])(_lm_head_grad_kernel)


def tune_bucket(cols: int) -> int:
    """The backward kernel's autotune key for a chunk of `cols` vocab columns: the next
    power of two, at least 256. Triton tunes anew for every new key value; the chunk
    width follows each micro-batch's token count (`default_chunk_cols`), so keying on
    the width itself re-tuned on almost every micro-batch (issue 21, item 7)."""
    return max(256, 1 << (max(cols, 1) - 1).bit_length())


def num_vocab_splits(
    n_rows: int, vocab: int, block_m: int, device: torch.device
) -> tuple[int, int]:
    """(splits, split_size) of the vocabulary for the statistics kernel.

    On the GPU: up to 32 splits of at least 2048 columns, so that the programs running
    at once (GROUP_M row blocks by many splits) share panels in L2, and at least about
    4 programs per SM in all."""
    row_blocks = triton.cdiv(n_rows, block_m)
    if device.type == "cuda":
        target = 4 * torch.cuda.get_device_properties(device).multi_processor_count
        wanted = max(min(32, triton.cdiv(vocab, 2048)), triton.cdiv(target, row_blocks))
    else:
        wanted = 2  # exercise the split combine under the interpreter
    splits = max(1, min(wanted, triton.cdiv(vocab, _SPLIT_QUANTUM)))
    split_size = triton.cdiv(triton.cdiv(vocab, splits), _SPLIT_QUANTUM) * _SPLIT_QUANTUM
    return triton.cdiv(vocab, split_size), split_size


def launch_lm_head_stats(
    hidden: Tensor,
    weight: Tensor,
    tokens: Tensor,
    temperature: float,
    vocab_start: int = 0,
    out: Tensor | None = None,
    splits: tuple[int, int] | None = None,
    vocab_size: int | None = None,
) -> Tensor:
    """Partial statistics [4, K, N] fp32 (m, S, B, x_y per vocab split) of
    hidden @ weight^T / T. `out` (optional) must be a contiguous [4, K, N] fp32 tensor
    with K from `num_vocab_splits` (or `splits` = (K, split_size)). Weight rows with
    global id >= `vocab_size` (vocab padding) are left out."""
    n, h = hidden.shape
    v = valid_columns(weight.shape[0], vocab_start, vocab_size)
    if weight.shape[1] != h:
        raise ValueError(f"hidden [{n}, {h}] and weight {tuple(weight.shape)} disagree on H")
    if hidden.stride(-1) != 1 or weight.stride(-1) != 1:
        raise ValueError("hidden and weight must have unit stride along H")
    device = hidden.device
    cuda = device.type == "cuda"
    block_m = _GPU_BLOCK_M_ESTIMATE if cuda else _CPU_META["BLOCK_M"]
    k, split_size = splits or num_vocab_splits(n, max(v, 1), block_m, device)
    if out is None:
        out = torch.empty(4, k, n, dtype=torch.float32, device=device)
    if out.shape != (4, k, n) or out.dtype != torch.float32 or not out.is_contiguous():
        raise ValueError(f"out must be a contiguous fp32 [4, {k}, {n}] tensor")
    if n == 0:
        return out
    if v == 0:
        out[0].fill_(float("-inf"))
        out[1:].zero_()
        return out
    require_launchable(_lm_head_stats_kernel, device)
    low_precision = hidden.dtype in (torch.bfloat16, torch.float16)
    kernel, meta = (_stats_tuned, {}) if cuda else (_lm_head_stats_kernel, dict(_CPU_META))

    def grid(conf: dict) -> tuple[int]:
        return (triton.cdiv(n, conf["BLOCK_M"]) * k,)

    kernel[grid](
        hidden, weight, tokens, out, n, v, h, int(vocab_start), 1.0 / float(temperature), split_size, k,
        hidden.stride(0), weight.stride(0),
        UPCAST=low_precision and device.type != "cuda",
        PRECISION="tf32" if low_precision else "ieee",
        **meta,
    )  # fmt: skip
    return out


def launch_lm_head_grad(
    hidden: Tensor,
    weight_chunk: Tensor,
    tokens: Tensor,
    row_stats: Tensor,
    grad_entropy: Tensor,
    grad_logprob: Tensor,
    out: Tensor,
    temperature: float,
    col_start: int,
    vocab_size: int | None = None,
    tune_cols: int | None = None,
) -> Tensor:
    """Write d loss / d logits for the vocab chunk `weight_chunk` ([C, H], global ids
    col_start .. col_start + C) into `out` [N, C], recomputing the logits tile by tile in
    fp32. row_stats: [3, N] fp32 (m, log S, H) over the whole vocabulary. `tune_cols`
    (default C): the width the GPU autotune key is bucketed from; the backward passes
    its full chunk width for every chunk, the shorter last one included."""
    n, h = hidden.shape
    c = weight_chunk.shape[0]
    if out.shape != (n, c) or out.stride(-1) != 1:
        raise ValueError(f"out must be [{n}, {c}] with unit column stride")
    if n == 0 or c == 0:
        return out
    device = hidden.device
    require_launchable(_lm_head_grad_kernel, device)
    cuda = device.type == "cuda"
    kernel, meta = (_grad_tuned, {}) if cuda else (_lm_head_grad_kernel, dict(_CPU_META))
    low_precision = hidden.dtype in (torch.bfloat16, torch.float16)

    def grid(conf: dict) -> tuple[int]:
        return (triton.cdiv(n, conf["BLOCK_M"]) * triton.cdiv(c, conf["BLOCK_V"]),)

    kernel[grid](
        hidden, weight_chunk, tokens, row_stats, grad_entropy, grad_logprob, out,
        n, c, valid_columns(c, col_start, vocab_size), h, int(col_start), 1.0 / float(temperature),
        hidden.stride(0), weight_chunk.stride(0), out.stride(0), tune_bucket(tune_cols or c),
        UPCAST=low_precision and device.type != "cuda",
        PRECISION="tf32" if low_precision else "ieee",
        **meta,
    )  # fmt: skip
    return out


def default_chunk_cols(
    n_rows: int, vocab: int, elem_bytes: int, budget_bytes: int = 512 << 20
) -> int:
    """Vocab columns per backward chunk so that the [N, chunk] buffer fits `budget_bytes`."""
    cols = budget_bytes // max(1, n_rows * elem_bytes)
    return int(max(256, min(vocab, cols // 256 * 256 if cols >= 256 else 256)))


@dataclass(frozen=True)
class _HeadOptions:
    temperature: float
    vocab_start: int
    vocab_size: int | None
    group: dist.ProcessGroup | None
    chunk_cols: int | None
    recompute: str  # "triton": tl.dot tiles in the kernels; "cublas": torch.mm per chunk


RECOMPUTE_MODES: tuple[str, ...] = ("triton", "cublas")


def _mm_fp32(a: Tensor, b_t: Tensor, out: Tensor) -> Tensor:
    """out (fp32) = a @ b_t with fp32 accumulation and fp32 output, for bf16/fp16 a, b."""
    if a.dtype == out.dtype:
        return torch.mm(a, b_t, out=out)
    if a.is_cuda:
        try:
            return torch.mm(a, b_t, out_dtype=out.dtype, out=out)
        except (RuntimeError, TypeError):  # torch builds without mm.dtype_out
            pass
    return torch.mm(a.to(out.dtype), b_t.to(out.dtype), out=out)


def _chunks(v: int, chunk: int):
    for c0 in range(0, v, chunk):
        yield c0, min(c0 + chunk, v)


def _cublas_partials(hidden: Tensor, weight: Tensor, tokens: Tensor, opts: _HeadOptions) -> Tensor:
    """Forward statistics [4, K, N] with one torch.mm per vocab chunk (fp32 logits in a
    [N, chunk] buffer) and kernel 1's statistics kernel on each chunk."""
    n, v = hidden.shape[0], weight.shape[0]
    chunk = opts.chunk_cols or default_chunk_cols(n, v, 4)
    buf = torch.empty(n * min(chunk, v), dtype=torch.float32, device=hidden.device)
    bounds = list(_chunks(v, chunk))
    partials = torch.empty(len(bounds), 4, n, dtype=torch.float32, device=hidden.device)
    for k, (c0, c1) in enumerate(bounds):
        z = _mm_fp32(hidden, weight[c0:c1].t(), buf[: n * (c1 - c0)].view(n, c1 - c0))
        launch_stats(
            z, tokens, partials[k], opts.temperature, opts.vocab_start + c0, opts.vocab_size
        )
    return partials.transpose(0, 1).contiguous()


class _FusedLMHeadFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, tokens, opts: _HeadOptions):
        if opts.recompute == "cublas":
            partials = _cublas_partials(hidden, weight, tokens, opts)
        else:
            partials = launch_lm_head_stats(
                hidden, weight, tokens, opts.temperature, opts.vocab_start,
                vocab_size=opts.vocab_size,
            )  # fmt: skip
        stats = combine_partial_stats(partials, opts.group)
        ctx.save_for_backward(hidden, weight, tokens, stats.packed())
        ctx.opts = opts
        return stats.entropy, stats.logprob

    @staticmethod
    def backward(ctx, grad_entropy, grad_logprob):
        hidden, weight, tokens, packed = ctx.saved_tensors
        opts: _HeadOptions = ctx.opts
        n, v = hidden.shape[0], weight.shape[0]
        zeros = torch.zeros(n, dtype=torch.float32, device=hidden.device)
        gh = zeros if grad_entropy is None else grad_entropy.float().contiguous()
        gl = zeros if grad_logprob is None else grad_logprob.float().contiguous()
        cublas = opts.recompute == "cublas"
        elem = hidden.element_size() + (4 if cublas else 0)
        chunk = opts.chunk_cols or default_chunk_cols(n, v, elem)
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        acc_dtype = torch.float64 if hidden.dtype == torch.float64 else torch.float32
        grad_h = (
            torch.zeros(n, hidden.shape[1], dtype=acc_dtype, device=hidden.device)
            if need_h
            else None
        )
        grad_w = torch.empty_like(weight) if need_w else None
        width = min(chunk, v)
        buf = torch.empty(n * width, dtype=hidden.dtype, device=hidden.device)
        buf32 = (
            torch.empty(n * width, dtype=torch.float32, device=hidden.device) if cublas else None
        )
        for c0, c1 in _chunks(v, chunk):
            w_c = weight[c0:c1]
            g = buf[: n * (c1 - c0)].view(n, c1 - c0)
            if cublas:
                z = _mm_fp32(hidden, w_c.t(), buf32[: n * (c1 - c0)].view(n, c1 - c0))
                launch_grad(
                    z, g, tokens, packed, gh, gl, opts.temperature, opts.vocab_start + c0,
                    opts.vocab_size,
                )  # fmt: skip
            else:
                launch_lm_head_grad(
                    hidden, w_c, tokens, packed, gh, gl, g,
                    opts.temperature, opts.vocab_start + c0, opts.vocab_size, tune_cols=width,
                )  # fmt: skip
            if grad_h is not None:
                grad_h += torch.mm(g, w_c)
            if need_w:
                torch.mm(g.t(), hidden, out=grad_w[c0:c1])
        out_h = None
        if grad_h is not None:
            out_h = grad_h.to(hidden.dtype)
            if opts.group is not None and dist.get_world_size(opts.group) > 1:
                dist.all_reduce(out_h, group=opts.group)
        return out_h, grad_w, None, None


def fused_lm_head_entropy_logprob(
    hidden: Tensor,
    weight: Tensor,
    tokens: Tensor,
    temperature: float = 1.0,
    group: dist.ProcessGroup | None = None,
    vocab_start: int | None = None,
    chunk_cols: int | None = None,
    vocab_size: int | None = None,
    recompute: str = "triton",
) -> tuple[Tensor, Tensor]:
    """Entropy and log-prob of softmax(hidden @ weight^T / T) without full logits.

    Args:
        hidden: [..., H] final hidden states (bf16 / fp16 / fp32).
        weight: [V_local, H] output weight, this rank's vocab shard (all of it without
            `group`), same dtype as hidden.
        tokens: [...] global token ids.
        group: tensor-parallel group the vocabulary is sharded over, or None.
        vocab_start: global id of this shard's first row; default rank * V_local.
        chunk_cols: vocab columns per backward chunk; default: a 512 MiB buffer.
        vocab_size: the true vocabulary size; weight rows with global id >= it
            (Megatron's vocab padding) are left out and get zero gradient.
        recompute: how logits tiles are made: "triton" (tl.dot inside the fused kernels,
            nothing logits-sized is written) or "cublas" (one torch.mm per vocab chunk
            into an fp32 [N, chunk_cols] buffer, then kernel 1 on the chunk). Which is
            faster depends on the GPU; benchmarks/kernel_bench.py measures both.
    Returns:
        (entropy, logprob), each [...] fp32 in nats, over the whole vocabulary.
        Differentiable w.r.t. hidden and weight.
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if hidden.shape[:-1] != tokens.shape:
        raise ValueError(f"hidden {tuple(hidden.shape)} and tokens {tuple(tokens.shape)} differ")
    if weight.dim() != 2 or weight.shape[0] == 0 or weight.shape[1] != hidden.shape[-1]:
        raise ValueError(f"weight must be [V, {hidden.shape[-1]}], got {tuple(weight.shape)}")
    if weight.dtype != hidden.dtype:
        raise ValueError(f"hidden is {hidden.dtype} but weight is {weight.dtype}")
    if recompute not in RECOMPUTE_MODES:
        raise ValueError(f"recompute must be one of {RECOMPUTE_MODES}, got {recompute!r}")
    if vocab_start is None:
        vocab_start = (dist.get_rank(group) if group is not None else 0) * weight.shape[0]
    opts = _HeadOptions(
        float(temperature), int(vocab_start), vocab_size, group, chunk_cols, recompute
    )
    lead = tokens.shape
    flat = hidden.reshape(-1, hidden.shape[-1]).contiguous()
    toks = tokens.reshape(-1).to(torch.int64).contiguous()
    entropy, logprob = _FusedLMHeadFn.apply(flat, weight.contiguous(), toks, opts)
    return entropy.reshape(lead), logprob.reshape(lead)
