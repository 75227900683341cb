"""Kernel 3: the per-token policy-loss terms in one elementwise kernel, fwd and bwd.

Matches `archer_mcore.algo.losses.token_terms` (the torch reference), including its
gradients at ties (torch.maximum / torch.minimum give each side half the gradient where
both sides are equal, clamp passes the gradient on its closed interval):

    log_ratio = clamp(logp - old_logp, -20, 20);  r = exp(log_ratio)
    l = max(-A r, -A clip(r, 1 - eps_low, 1 + eps_high));  for A < 0: l = min(l, -A c)
    clipped_low = (A < 0) & (r < 1 - eps_low);  clipped_high = (A > 0) & (r > 1 + eps_high)
    clipped_dual = (A < 0) & (r > c)
    KL with d = logp - ref_logp, x = clamp(-d, -20, 20):
        k1 = d,  k2 = d^2 / 2,  k3 = clamp(e^x - x - 1, -10, 10)

Gradients flow to logp only; eps_low / eps_high are floats or per-token tensors (the
per-group clip of Archer). The math is fp32; outputs take logp's dtype.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from archer_mcore.kernels._launch import require_launchable, tile_meta
from torch import Tensor

KL_CODES: dict[str, int] = {"k1": 1, "k2": 2, "k3": 3}


@triton.jit
def _half_step(a, b):
    """Weight torch gives `a` in d max(a, b) / d a: 1 if a > b, 1/2 if a == b, else 0."""
    return tl.where(a > b, 1.0, tl.where(a == b, 0.5, 0.0))


@triton.jit
def _terms(
    lp,
    old,
    adv,
    eps_lo,
    eps_hi,
    clip_c,
    ref,
    HAS_DUAL: tl.constexpr,
    HAS_REF: tl.constexpr,
    KL: tl.constexpr,
):
    """Values and d/d logp of (pg_loss, kl, ratio), plus the three clip flags."""
    d = lp - old
    r = tl.exp(tl.minimum(tl.maximum(d, -20.0), 20.0))
    dr = tl.where((d >= -20.0) & (d <= 20.0), r, 0.0)  # d r / d logp
    lower = 1.0 - eps_lo
    upper = 1.0 + eps_hi
    unclipped = -adv * r
    r_low = tl.maximum(r, lower)
    clipped = -adv * tl.minimum(r_low, upper)
    d_clipped = -adv * _half_step(r, lower) * _half_step(upper, r_low)  # d/dr
    loss = tl.maximum(unclipped, clipped)
    w = _half_step(unclipped, clipped)
    dloss = w * -adv + (1.0 - w) * d_clipped  # d/dr
    neg = adv < 0.0
    if HAS_DUAL:
        cap = -adv * clip_c
        dloss = tl.where(neg, _half_step(cap, loss) * dloss, dloss)
        loss = tl.where(neg, tl.minimum(loss, cap), loss)
        flag_dual = neg & (r > clip_c)
    else:
        flag_dual = neg & (r != r)  # all False, same shape
    dloss = dloss * dr
    if HAS_REF:
        diff = lp - ref
        if KL == 1:
            kl = diff
            dkl = tl.full(diff.shape, 1.0, tl.float32)
        elif KL == 2:
            kl = 0.5 * diff * diff
            dkl = diff
        else:
            x_raw = -diff
            x = tl.minimum(tl.maximum(x_raw, -20.0), 20.0)
            ex = tl.exp(x)
            v = ex - x - 1.0
            kl = tl.minimum(tl.maximum(v, -10.0), 10.0)
            dx = tl.where((x_raw >= -20.0) & (x_raw <= 20.0), -1.0, 0.0)
            dkl = tl.where((v >= -10.0) & (v <= 10.0), (ex - 1.0) * dx, 0.0)
    else:
        kl = tl.zeros(lp.shape, tl.float32)
        dkl = tl.zeros(lp.shape, tl.float32)
    flag_low = neg & (r < lower)
    flag_high = (adv > 0.0) & (r > upper)
    return loss, dloss, kl, dkl, r, dr, flag_low, flag_high, flag_dual


@triton.jit
def _loss_fwd_kernel(
    lp_ptr, old_ptr, adv_ptr, lo_ptr, hi_ptr, ref_ptr,
    loss_ptr, kl_ptr, ratio_ptr, flags_ptr,  # flags: [3, N] int8 (low, high, dual)
    lo_stride, hi_stride, n, clip_c,
    HAS_DUAL: tl.constexpr, HAS_REF: tl.constexpr, KL: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    lp = tl.load(lp_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    old = tl.load(old_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    adv = tl.load(adv_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    lo = tl.load(lo_ptr + offs * lo_stride, mask=mask, other=0.0).to(tl.float32)
    hi = tl.load(hi_ptr + offs * hi_stride, mask=mask, other=0.0).to(tl.float32)
    ref = lp
    if HAS_REF:
        ref = tl.load(ref_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    loss, _, kl, _, r, _, f_low, f_high, f_dual = _terms(
        lp, old, adv, lo, hi, clip_c, ref, HAS_DUAL, HAS_REF, KL
    )
    out_ty = loss_ptr.dtype.element_ty
    tl.store(loss_ptr + offs, loss.to(out_ty), mask=mask)
    tl.store(kl_ptr + offs, kl.to(out_ty), mask=mask)
    tl.store(ratio_ptr + offs, r.to(out_ty), mask=mask)
    tl.store(flags_ptr + offs, f_low.to(tl.int8), mask=mask)
    tl.store(flags_ptr + n + offs, f_high.to(tl.int8), mask=mask)
    tl.store(flags_ptr + 2 * n + offs, f_dual.to(tl.int8), mask=mask)


@triton.jit
def _loss_bwd_kernel(
    lp_ptr, old_ptr, adv_ptr, lo_ptr, hi_ptr, ref_ptr,
    g_loss_ptr, g_kl_ptr, g_ratio_ptr, grad_ptr,
    lo_stride, hi_stride, n, clip_c,
    HAS_DUAL: tl.constexpr, HAS_REF: tl.constexpr, KL: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    lp = tl.load(lp_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    old = tl.load(old_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    adv = tl.load(adv_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    lo = tl.load(lo_ptr + offs * lo_stride, mask=mask, other=0.0).to(tl.float32)
    hi = tl.load(hi_ptr + offs * hi_stride, mask=mask, other=0.0).to(tl.float32)
    ref = lp
    if HAS_REF:
        ref = tl.load(ref_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    _, dloss, _, dkl, _, dr, _, _, _ = _terms(
        lp, old, adv, lo, hi, clip_c, ref, HAS_DUAL, HAS_REF, KL
    )
    g = tl.load(g_loss_ptr + offs, mask=mask, other=0.0).to(tl.float32) * dloss
    g += tl.load(g_kl_ptr + offs, mask=mask, other=0.0).to(tl.float32) * dkl
    g += tl.load(g_ratio_ptr + offs, mask=mask, other=0.0).to(tl.float32) * dr
    tl.store(grad_ptr + offs, g.to(grad_ptr.dtype.element_ty), mask=mask)


def _meta(device: torch.device) -> dict[str, int]:
    return tile_meta(device, gpu={"BLOCK": 1024, "num_warps": 4}, cpu={"BLOCK": 256})


@dataclass
class _Consts:
    clip_c: float
    has_dual: bool
    has_ref: bool
    kl: int


def _per_token(value: Tensor | float, like: Tensor) -> tuple[Tensor, int]:
    """A float or a tensor broadcastable to `like`, as (flat fp32 tensor, stride)."""
    if isinstance(value, Tensor) and value.numel() > 1:
        flat = value.detach().to(torch.float32).expand_as(like).reshape(-1).contiguous()
        return flat, 1
    t = torch.as_tensor(value, dtype=torch.float32, device=like.device).detach().reshape(1)
    return t, 0


def launch_token_terms_fwd(
    logp: Tensor,
    old_logp: Tensor,
    advantages: Tensor,
    eps_low: tuple[Tensor, int],
    eps_high: tuple[Tensor, int],
    ref_logp: Tensor | None,
    clip_c: float | None,
    kl_estimator: str,
    out: tuple[Tensor, Tensor, Tensor, Tensor],
) -> None:
    """Run the forward kernel on flat contiguous [N] inputs into `out` = (pg_loss, kl,
    ratio: [N] of logp's dtype; flags: [3, N] int8 rows low, high, dual). eps_* are
    (tensor, stride) pairs: stride 0 for one value, 1 for per-token values."""
    loss, kl, ratio, flags = out
    n = logp.numel()
    if n == 0:
        return
    meta = _meta(logp.device)
    require_launchable(_loss_fwd_kernel, logp.device)
    _loss_fwd_kernel[(triton.cdiv(n, meta["BLOCK"]),)](
        logp, old_logp, advantages, eps_low[0], eps_high[0],
        ref_logp if ref_logp is not None else logp,
        loss, kl, ratio, flags, eps_low[1], eps_high[1], n,
        float(clip_c) if clip_c is not None else 0.0,
        HAS_DUAL=clip_c is not None, HAS_REF=ref_logp is not None, KL=KL_CODES[kl_estimator],
        **meta,
    )  # fmt: skip


def launch_token_terms_bwd(
    logp: Tensor,
    old_logp: Tensor,
    advantages: Tensor,
    eps_low: tuple[Tensor, int],
    eps_high: tuple[Tensor, int],
    ref_logp: Tensor | None,
    clip_c: float | None,
    kl_estimator: str,
    upstream: tuple[Tensor, Tensor, Tensor],
    grad_out: Tensor,
) -> None:
    """Run the backward kernel: grad_out [N] = d(sum of upstream (pg_loss, kl, ratio)
    gradients times the terms) / d logp. Arguments as `launch_token_terms_fwd`."""
    n = logp.numel()
    if n == 0:
        return
    meta = _meta(logp.device)
    require_launchable(_loss_bwd_kernel, logp.device)
    _loss_bwd_kernel[(triton.cdiv(n, meta["BLOCK"]),)](
        logp, old_logp, advantages, eps_low[0], eps_high[0],
        ref_logp if ref_logp is not None else logp,
        *upstream, grad_out, eps_low[1], eps_high[1], n,
        float(clip_c) if clip_c is not None else 0.0,
        HAS_DUAL=clip_c is not None, HAS_REF=ref_logp is not None, KL=KL_CODES[kl_estimator],
        **meta,
    )  # fmt: skip


class _TokenTermsFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logp, old, adv, lo, hi, ref, lo_stride, hi_stride, consts):
        n = logp.numel()
        loss, kl, ratio = (torch.empty_like(logp) for _ in range(3))
        flags = torch.empty(3, n, dtype=torch.int8, device=logp.device)
        est = {code: name for name, code in KL_CODES.items()}[consts.kl]
        launch_token_terms_fwd(
            logp, old, adv, (lo, lo_stride), (hi, hi_stride), ref,
            consts.clip_c if consts.has_dual else None, est, (loss, kl, ratio, flags),
        )  # fmt: skip
        ref_arg = ref if ref is not None else logp
        ctx.save_for_backward(logp, old, adv, lo, hi, ref_arg)
        ctx.strides, ctx.consts = (lo_stride, hi_stride), consts
        flags_bool = flags.bool()
        ctx.mark_non_differentiable(flags_bool)
        return loss, kl, ratio, flags_bool

    @staticmethod
    def backward(ctx, g_loss, g_kl, g_ratio, _g_flags):
        logp, old, adv, lo, hi, ref = ctx.saved_tensors
        consts: _Consts = ctx.consts
        zeros = torch.zeros_like(logp)
        g_loss = zeros if g_loss is None else g_loss.contiguous()
        g_kl = zeros if g_kl is None else g_kl.contiguous()
        g_ratio = zeros if g_ratio is None else g_ratio.contiguous()
        grad = torch.empty_like(logp)
        est = {code: name for name, code in KL_CODES.items()}[consts.kl]
        launch_token_terms_bwd(
            logp, old, adv, (lo, ctx.strides[0]), (hi, ctx.strides[1]),
            ref if consts.has_ref else None, consts.clip_c if consts.has_dual else None, est,
            (g_loss, g_kl, g_ratio), grad,
        )  # fmt: skip
        return grad, None, None, None, None, None, None, None, None


@dataclass
class FusedTokenTerms:
    """Same fields as `archer_mcore.algo.losses.TokenTerms`, each the shape of logp."""

    pg_loss: Tensor
    kl: Tensor
    ratio: Tensor
    clipped_low: Tensor
    clipped_high: Tensor
    clipped_dual: Tensor


def fused_token_terms(
    logp: Tensor,
    old_logp: Tensor,
    advantages: Tensor,
    eps_low: Tensor | float,
    eps_high: Tensor | float,
    clip_c: float | None,
    ref_logp: Tensor | None = None,
    kl_estimator: str = "k3",
) -> FusedTokenTerms:
    """The fused kernel form of `token_terms` (see the module docstring).

    Args:
        logp: [...] current log-probs (the only input that receives a gradient).
        old_logp, advantages, ref_logp: broadcastable to logp (treated as constants).
        eps_low, eps_high: floats or per-token tensors broadcastable to logp.
        clip_c: dual-clip cap for A < 0, or None.
    """
    if kl_estimator not in KL_CODES:
        raise ValueError(f"unknown KL estimator {kl_estimator!r}; choose one of {tuple(KL_CODES)}")
    shape = logp.shape
    lp = logp.reshape(-1)
    if not lp.is_contiguous():
        lp = lp.contiguous()

    def flat(t: Tensor) -> Tensor:
        return t.detach().to(logp.dtype).expand(shape).reshape(-1).contiguous()

    lo, lo_stride = _per_token(eps_low, logp)
    hi, hi_stride = _per_token(eps_high, logp)
    consts = _Consts(
        clip_c=float(clip_c) if clip_c is not None else 0.0,
        has_dual=clip_c is not None,
        has_ref=ref_logp is not None,
        kl=KL_CODES[kl_estimator],
    )
    ref = flat(ref_logp) if ref_logp is not None else None
    loss, kl, ratio, flags = _TokenTermsFn.apply(
        lp, flat(old_logp), flat(advantages), lo, hi, ref, lo_stride, hi_stride, consts
    )
    low, high, dual = (f.reshape(shape) for f in flags.unbind(0))
    return FusedTokenTerms(
        pg_loss=loss.reshape(shape),
        kl=kl.reshape(shape),
        ratio=ratio.reshape(shape),
        clipped_low=low,
        clipped_high=high,
        clipped_dual=dual,
    )
