"""Independent float64 references for the kernel tests (plain autograd, no chunking)."""

from __future__ import annotations

import torch
from torch import Tensor


def entropy_logprob64(logits: Tensor, tokens: Tensor, temperature: float) -> tuple[Tensor, Tensor]:
    """H = -sum p log p and log p[y] of softmax(z / T), in float64 (differentiable)."""
    logp_all = torch.log_softmax(logits.double() / temperature, dim=-1)
    entropy = -(logp_all.exp() * logp_all).sum(-1)
    logprob = logp_all.gather(-1, tokens.long().unsqueeze(-1)).squeeze(-1)
    return entropy, logprob


def token_terms64(
    logp: Tensor,
    old_logp: Tensor,
    adv: Tensor,
    eps_low: Tensor | float,
    eps_high: Tensor | float,
    clip_c: float | None,
    ref_logp: Tensor | None,
    estimator: str,
) -> dict[str, Tensor]:
    """Per-token loss terms written with explicit branches (torch.where), float64.

    Branches instead of max/min: inside the clip range the clipped and unclipped losses
    coincide with equal derivatives, so the branch picked at ties does not matter.
    """
    lp, old, a = logp.double(), old_logp.double(), adv.double()
    lo = 1.0 - torch.as_tensor(eps_low, dtype=torch.float64)
    hi = 1.0 + torch.as_tensor(eps_high, dtype=torch.float64)
    r = torch.exp(torch.clamp(lp - old, -20.0, 20.0))
    r_clip = torch.where(r < lo, lo, torch.where(r > hi, hi, r))
    unclipped, clipped = -a * r, -a * r_clip
    loss = torch.where(unclipped >= clipped, unclipped, clipped)
    neg = a < 0
    if clip_c is not None:
        cap = -a * clip_c
        loss = torch.where(neg & (loss > cap), cap, loss)
        dual = neg & (r > clip_c)
    else:
        dual = torch.zeros_like(neg)
    if ref_logp is None:
        kl = torch.zeros_like(lp)
    else:
        d = lp - ref_logp.double()
        if estimator == "k1":
            kl = d
        elif estimator == "k2":
            kl = 0.5 * d * d
        else:
            x = torch.clamp(-d, -20.0, 20.0)
            kl = torch.clamp(torch.exp(x) - x - 1.0, -10.0, 10.0)
    return {
        "pg_loss": loss,
        "kl": kl,
        "ratio": r,
        "clipped_low": neg & (r < lo),
        "clipped_high": (a > 0) & (r > hi),
        "clipped_dual": dual,
    }


def rel_err(actual: Tensor, expected: Tensor) -> float:
    """max |actual - expected| / max |expected| (0 when both are all zero)."""
    diff = (actual.double() - expected.double()).abs().max().item()
    scale = expected.double().abs().max().item()
    if scale == 0.0:
        return diff
    return diff / scale
