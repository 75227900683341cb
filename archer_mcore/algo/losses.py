"""One policy-loss function for GRPO, DAPO, Archer and forking tokens.

The algorithms differ only in a *token-group rule* and per-group constants:

- ``none``    every valid token is in one group, ``all``.
- ``archer``  per response, tokens strictly above the response's entropy quantile are
              ``reasoning`` tokens, the rest ``knowledge`` tokens; all are updated, each
              group under its own clip range and KL coefficient.
- ``forking`` only the top-rho entropy tokens (``forking``) carry policy gradient; the
              rest (``other``) carry none.

Shapes: B responses, L response positions; `mask` [B, L] is True on valid tokens.
Log-probs are natural-log, per token, fp32.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor

from archer_mcore.algo.kl import kl_estimate
from archer_mcore.algo.token_groups import archer_reasoning_mask, forking_k, forking_mask
from archer_mcore.config import AlgorithmConfig

AGG_MODES: tuple[str, ...] = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum")
TOKEN_RULES: tuple[str, ...] = ("none", "archer", "forking")


#: The loss reads the config's `algorithm` section itself (`archer_mcore.config`), so no
#: field can be lost in a copy: `LossConfig` is that class under the name the loss's
#: callers use. Fields read here: token_rule, clip_low/high, reasoning_clip_low/high,
#: clip_ratio_c (dual-clip cap for A < 0; None disables it), kl_coef, reasoning_kl_coef,
#: kl_estimator, entropy_coef, agg_mode, archer_quantile, forking_rho,
#: forking_normalizer. Clip/KL fields without a prefix apply to all tokens (rule
#: ``none``/``forking``) or to knowledge tokens (rule ``archer``).
LossConfig = AlgorithmConfig


@dataclass
class TokenTerms:
    """Per-token pieces of the loss, all the shape of `logp`."""

    pg_loss: Tensor
    kl: Tensor
    ratio: Tensor
    clipped_low: Tensor  # bool: A < 0 and r < 1 - eps_low (the lower clip is active)
    clipped_high: Tensor  # bool: A > 0 and r > 1 + eps_high
    clipped_dual: Tensor  # bool: A < 0 and r > c (the dual clip caps the loss)


def token_terms(
    logp: Tensor,
    old_logp: Tensor,
    advantages: Tensor,
    eps_low: Tensor | float,
    eps_high: Tensor | float,
    clip_c: float | None,
    ref_logp: Tensor | None = None,
    kl_estimator: str = "k3",
) -> TokenTerms:
    """The elementwise core (the fused loss kernel computes exactly this).

    r = exp(clamp(logp - old_logp, -20, 20));
    l = max(-A r, -A clip(r, 1 - eps_low, 1 + eps_high)); for A < 0: l = min(l, -A c).
    Gradients flow to `logp` only.
    """
    adv = advantages.detach()
    ratio = torch.exp(torch.clamp(logp - old_logp.detach(), -20.0, 20.0))
    lower = 1.0 - torch.as_tensor(eps_low, dtype=ratio.dtype, device=ratio.device)
    upper = 1.0 + torch.as_tensor(eps_high, dtype=ratio.dtype, device=ratio.device)
    unclipped = -adv * ratio
    clipped = -adv * torch.minimum(torch.maximum(ratio, lower), upper)
    loss = torch.maximum(unclipped, clipped)
    negative = adv < 0
    if clip_c is not None:
        dual = torch.minimum(loss, -adv * clip_c)
        loss = torch.where(negative, dual, loss)
        clipped_dual = negative & (ratio.detach() > clip_c)
    else:
        clipped_dual = torch.zeros_like(negative)
    r = ratio.detach()
    if ref_logp is None:
        kl = torch.zeros_like(logp)
    else:
        kl = kl_estimate(logp, ref_logp.detach(), kl_estimator)
    return TokenTerms(
        pg_loss=loss,
        kl=kl,
        ratio=ratio,
        clipped_low=negative & (r < lower),
        clipped_high=(adv > 0) & (r > upper),
        clipped_dual=clipped_dual,
    )


def aggregate(values: Tensor, mask: Tensor, mode: str, denom_mask: Tensor | None = None) -> Tensor:
    """Reduce token values [B, L] to a scalar.

    `mask` picks the tokens summed; `denom_mask` (default `mask`) the tokens counted.
    token-mean: sum / count over the batch. seq-mean-token-mean: per response sum / count,
    then the mean over responses. seq-mean-token-sum: per response sum, then the mean.
    Responses are the rows with at least one valid token in `denom_mask` for token-mean
    and in `row_valid` below otherwise; an empty selection gives 0.
    """
    denom_mask = mask if denom_mask is None else denom_mask
    v = torch.where(mask, values, torch.zeros_like(values))
    if mode == "token-mean":
        return v.sum() / denom_mask.sum().clamp(min=1)
    rows = denom_mask.any(-1) | mask.any(-1)
    per_seq = v.sum(-1)
    if mode == "seq-mean-token-mean":
        per_seq = per_seq / denom_mask.sum(-1).clamp(min=1)
    elif mode != "seq-mean-token-sum":
        raise ValueError(f"unknown aggregation {mode!r}; choose one of {AGG_MODES}")
    return per_seq[rows].sum() / rows.sum().clamp(min=1)


def token_group_masks(
    entropy: Tensor,
    mask: Tensor,
    cfg: LossConfig,
    dp_group: dist.ProcessGroup | None = None,
    selection: Tensor | None = None,
) -> dict[str, Tensor]:
    """The rule's groups as boolean masks [B, L] (padding in none), plus ``all``.

    For ``forking``, `selection` (if given) is a precomputed forking mask, e.g. chosen over
    a whole mini-batch; otherwise the top-rho tokens of this call's tensors (with
    `dp_group`: of the union over that group) are selected.
    """
    groups = {"all": mask}
    if cfg.token_rule == "archer":
        reasoning = archer_reasoning_mask(entropy, mask, cfg.archer_quantile)
        groups["knowledge"] = mask & ~reasoning
        groups["reasoning"] = reasoning
    elif cfg.token_rule == "forking":
        fork = (
            selection & mask
            if selection is not None
            else forking_mask(entropy, mask, cfg.forking_rho, dp_group)
        )
        groups["forking"] = fork
        groups["other"] = mask & ~fork
    elif cfg.token_rule != "none":
        raise ValueError(f"unknown token rule {cfg.token_rule!r}; choose one of {TOKEN_RULES}")
    return groups


def policy_loss(
    logp: Tensor,
    old_logp: Tensor,
    advantages: Tensor,
    mask: Tensor,
    entropy: Tensor,
    ref_logp: Tensor | None,
    cfg: LossConfig,
    dp_group: dist.ProcessGroup | None = None,
    normalizer: float | None = None,
    selection: Tensor | None = None,
    token_weights: Tensor | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """The policy loss and its metrics.

    Args:
        logp: [B, L] current-policy log-probs of the sampled tokens (with grad).
        old_logp: [B, L] rollout/old-policy log-probs.
        advantages: [B] per response or [B, L] per token.
        mask: [B, L] bool, valid response tokens.
        entropy: [B, L] current-policy token entropies (detached for grouping; carries
            grad only if `cfg.entropy_coef` != 0).
        ref_logp: [B, L] reference-policy log-probs, or None (no KL).
        normalizer: for gradient accumulation. The loss is a mean over *units* (tokens
            for token-mean, responses otherwise); with `normalizer` given it is
            rescaled to local_mean * local_units / normalizer, so that micro-batch losses
            sum to the mini-batch loss when `normalizer` is the mini-batch's unit count
            (`normalizer_units`, `accumulation_normalizer`).
        selection: precomputed forking mask (mini-batch scope), see `token_group_masks`.
        token_weights: [B, L] per-token weights of the policy-gradient term (detached),
            e.g. truncated importance-sampling weights (`algo.rollout_correction`).
    Returns:
        (loss scalar, metrics of detached 0-dim tensors): loss/pg, loss/kl, loss/entropy,
        and per group g: clip/low/g, clip/high/g, clip/dual/g, kl/g, entropy/g, share/g,
        tokens/g.
    """
    mask = mask.bool()
    if advantages.dim() == 1:
        advantages = advantages.unsqueeze(-1).expand_as(logp)
    groups = token_group_masks(entropy, mask, cfg, dp_group, selection)

    eps_low: Tensor | float = cfg.clip_low
    eps_high: Tensor | float = cfg.clip_high
    if cfg.token_rule == "archer":
        reasoning = groups["reasoning"]
        eps_low = torch.full_like(logp, cfg.clip_low).masked_fill(reasoning, cfg.reasoning_clip_low)
        eps_high = torch.full_like(logp, cfg.clip_high).masked_fill(
            reasoning, cfg.reasoning_clip_high
        )
    terms = token_terms(
        logp, old_logp, advantages, eps_low, eps_high, cfg.clip_ratio_c, ref_logp, cfg.kl_estimator
    )

    if cfg.token_rule == "forking":
        pg_mask = groups["forking"]
        denom = pg_mask if cfg.forking_normalizer == "selected" else mask
    else:
        pg_mask = denom = mask
    pg_terms = terms.pg_loss
    if token_weights is not None:
        pg_terms = pg_terms * token_weights.detach().to(pg_terms.dtype)
    pg = aggregate(pg_terms, pg_mask, cfg.agg_mode, denom)

    kl_total = logp.new_zeros(()) if ref_logp is None else kl_term(terms.kl, groups, cfg)
    ent_total = logp.new_zeros(())
    if cfg.entropy_coef != 0.0:
        ent_total = -cfg.entropy_coef * aggregate(entropy, mask, cfg.agg_mode)

    loss = pg + kl_total + ent_total
    if normalizer is not None:
        loss = loss * unit_count(mask, denom, cfg.agg_mode).to(loss.dtype) / normalizer

    metrics = {
        "loss/pg": pg.detach(),
        "loss/kl": kl_total.detach(),
        "loss/entropy": ent_total.detach(),
    }
    metrics.update(group_metrics(groups, mask, entropy, terms))
    return loss, metrics


def kl_term(kl: Tensor, groups: dict[str, Tensor], cfg: LossConfig) -> Tensor:
    """The KL penalty: sum over groups of coef * the group's aggregated per-token KL
    [B, L] (Archer: knowledge and reasoning groups with their own coefficients; else
    kl_coef over all tokens); a coefficient of 0 adds nothing."""
    if cfg.token_rule == "archer":
        coefs = {"knowledge": cfg.kl_coef, "reasoning": cfg.reasoning_kl_coef}
    else:
        coefs = {"all": cfg.kl_coef}
    total = kl.new_zeros(())
    for name, coef in coefs.items():
        if coef != 0.0:
            total = total + coef * aggregate(kl, groups[name], cfg.agg_mode)
    return total


def group_metrics(
    groups: dict[str, Tensor], mask: Tensor, entropy: Tensor, terms: TokenTerms
) -> dict[str, Tensor]:
    """Per token group g (masks [B, L]): tokens/g (count), share/g (of the valid tokens),
    and the means over g's tokens of entropy/g, kl/g and the clip indicators clip/low/g,
    clip/high/g, clip/dual/g; detached 0-dim tensors."""
    metrics: dict[str, Tensor] = {}
    n_valid = mask.sum().clamp(min=1)
    ent = entropy.detach().float()
    for name, g in groups.items():
        n = g.sum()
        denom_g = n.clamp(min=1)
        metrics[f"tokens/{name}"] = n.detach().float()
        metrics[f"share/{name}"] = (n / n_valid).float()
        metrics[f"entropy/{name}"] = (ent * g).sum() / denom_g
        metrics[f"kl/{name}"] = (terms.kl.detach() * g).sum() / denom_g
        metrics[f"clip/low/{name}"] = (terms.clipped_low & g).sum() / denom_g
        metrics[f"clip/high/{name}"] = (terms.clipped_high & g).sum() / denom_g
        metrics[f"clip/dual/{name}"] = (terms.clipped_dual & g).sum() / denom_g
    return metrics


# ------------------------------------------------------------ gradient accumulation
# A mini-batch is split into micro-batches (and over data-parallel ranks); each
# micro-batch loss is its own mean rescaled to sum-of-terms / N, N = the mini-batch's
# units over all ranks, so the accumulated gradient is that of the mini-batch loss
# whatever the split. The units are counted here; the caller only sums them over ranks.


def unit_count(mask: Tensor, denom: Tensor, agg_mode: str) -> Tensor:
    """The units a loss of `agg_mode` is a mean over: the tokens of `denom` [B, L] for
    token-mean, else the responses (rows of `mask` [B, L] with a valid token)."""
    return denom.sum() if agg_mode == "token-mean" else mask.any(-1).sum()


def normalizer_units(
    mask: Tensor,
    cfg: LossConfig,
    selection: Tensor | None = None,
    microbatch_masks: Sequence[Tensor] = (),
) -> float:
    """The normalising units of these rows (one rank's share of a mini-batch), as
    `policy_loss` counts them: valid tokens for token-mean (forking with
    forking_normalizer "selected": the selected tokens, those of `selection` [B, L], or
    without a mini-batch selection forking_k(N) per micro-batch of N valid tokens,
    `microbatch_masks` [b, Lm] each); responses for the seq-mean modes."""
    mask = mask.bool()
    denom = mask
    if (
        cfg.agg_mode == "token-mean"
        and cfg.token_rule == "forking"
        and cfg.forking_normalizer == "selected"
    ):
        if selection is None:  # micro-batch scope: forking_k(N) tokens per micro-batch
            return float(sum(forking_k(int(m.sum()), cfg.forking_rho) for m in microbatch_masks))
        denom = selection.bool() & mask
    return float(unit_count(mask, denom, cfg.agg_mode))


def accumulation_normalizer(global_units: float, dp_size: int) -> float:
    """The `normalizer` each micro-batch's `policy_loss` takes: N_global / dp (at least
    1 / dp), N_global = `normalizer_units` summed over the data-parallel ranks. Megatron
    DDP averages gradients over the dp ranks, so with this the update is the gradient
    of the mini-batch loss sum-of-terms / N_global."""
    return max(global_units, 1.0) / dp_size
