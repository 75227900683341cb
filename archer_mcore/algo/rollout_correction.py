"""Correcting for the rollout engine not being the trainer (FP8 weights, other kernels).

Responses are sampled by the rollout engine's policy mu (SGLang, possibly with FP8
weights), while the PPO ratio uses the trainer's old policy pi_old. Truncated
importance sampling (TIS, Yao et al. 2025, "Your efficient RL framework secretly
brings you off-policy RL training") reweights each token's policy-gradient term by

    w_t = min(exp(logp_old_train_t - logp_rollout_t), cap)

computed without gradient; padding gets w = 0. The mismatch itself is reported as
the k3 estimate of KL(mu || pi_old) over the sampled tokens, with
x = logp_old_train - logp_rollout (the samples come from mu, so this is the
unbiased direction): k3 = e^x - x - 1 >= 0, and k1 = -x, both as token means.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor


def truncated_is_weights(
    logp_old_train: Tensor, logp_rollout: Tensor, cap: float, mask: Tensor | None = None
) -> Tensor:
    """w_t = min(exp(logp_old_train - logp_rollout), cap), detached; 0 where mask is 0.

    Shapes [...] (any, all equal), log-probs in nats. exp is taken of the log-ratio
    clamped at log(cap), which equals the min and cannot overflow.
    """
    if not cap > 0:
        raise ValueError(f"rollout.tis_cap must be > 0, got {cap!r}")
    d = (logp_old_train.detach() - logp_rollout.detach()).float()
    w = torch.exp(torch.clamp(d, max=math.log(cap)))
    if mask is not None:
        w = torch.where(mask.bool(), w, torch.zeros_like(w))
    return w


def apply_truncated_is(token_loss: Tensor, weights: Tensor) -> Tensor:
    """The per-token policy loss reweighted by TIS weights (same shape, [...])."""
    return token_loss * weights.to(token_loss.dtype)


def mismatch_metrics(
    logp_old_train: Tensor,
    logp_rollout: Tensor,
    mask: Tensor,
    cap: float | None = None,
) -> dict[str, float]:
    """Token means over mask of the trainer/rollout mismatch, as plain floats.

    mismatch_kl_k3: mean(e^x - x - 1), x = logp_old_train - logp_rollout
    mismatch_kl_k1: mean(-x)
    mismatch_abs_logp_diff_max: max |x|
    tis_weight_mean, tis_clipped_fraction (share of tokens with exp(x) > cap): with a cap.
    All are 0.0 (and `mismatch_tokens` 0) when the mask is empty.
    """
    m = mask.bool()
    x = (logp_old_train.detach() - logp_rollout.detach()).double()[m]
    n = int(x.numel())
    out: dict[str, float] = {"mismatch_tokens": float(n)}
    if n == 0:
        out.update(mismatch_kl_k3=0.0, mismatch_kl_k1=0.0, mismatch_abs_logp_diff_max=0.0)
        if cap is not None:
            out.update(tis_weight_mean=0.0, tis_clipped_fraction=0.0)
        return out
    out["mismatch_kl_k3"] = float((torch.expm1(x) - x).mean())
    out["mismatch_kl_k1"] = float((-x).mean())
    out["mismatch_abs_logp_diff_max"] = float(x.abs().max())
    if cap is not None:
        w = torch.exp(torch.clamp(x, max=math.log(cap)))
        out["tis_weight_mean"] = float(w.mean())
        out["tis_clipped_fraction"] = float((x > math.log(cap)).double().mean())
    return out
