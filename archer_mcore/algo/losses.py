"""One policy-loss function for GRPO, DAPO, Archer, forking tokens and any other
token rule.

The algorithms differ only in a *token rule* (`algo.token_rules`: none, archer,
forking, or a class named by import path) that gives the token groups, each group's
clip range and KL coefficient, the tokens that carry policy gradient and the tokens
the token-mean loss divides by. This module asks the rule and does the rest.

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
from archer_mcore.algo.token_rules import TokenRule, token_rule_for
from archer_mcore.config.algorithm import AGG_MODES, AlgorithmConfig

#: The loss reads the config's `algorithm` section itself (`archer_mcore.config`), so no
#: field can be lost in a copy: `LossConfig` is that class under the name the loss's
#: callers use. Read here: token_rule (through the rule it names), clip_ratio_c
#: (dual-clip cap for A < 0; None disables it), kl_estimator, entropy_coef, agg_mode;
#: the rule reads clip_low/high and kl_coef.
LossConfig = AlgorithmConfig


@dataclass(kw_only=True)
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
    *,
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
    *,
    dp_group: dist.ProcessGroup | None = None,
    selection: Tensor | None = None,
    rule: TokenRule | None = None,
) -> dict[str, Tensor]:
    """``all`` (= `mask`) and the rule's groups, boolean masks [B, L] (padding in none).

    `selection` is the rule's mini-batch selection for these rows (e.g. forking tokens
    chosen over a whole mini-batch), `dp_group` the data-parallel group a rule may
    select over (`TokenRule.token_groups`). `rule`: `token_rule_for(cfg)` if not given.
    """
    rule = token_rule_for(cfg) if rule is None else rule
    own = rule.token_groups(entropy.detach(), mask, dp_group, selection)
    if set(own) != set(rule.groups):
        raise ValueError(
            f"token rule {cfg.token_rule.name!r} returned the groups {sorted(own)}, "
            f"but declares {list(rule.groups)}"
        )
    return {"all": mask, **{name: own[name].bool() & mask for name in rule.groups}}


def policy_loss(
    logp: Tensor,
    old_logp: Tensor,
    advantages: Tensor,
    mask: Tensor,
    entropy: Tensor,
    *,
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
    rule = token_rule_for(cfg)
    groups = token_group_masks(
        entropy, mask, cfg, dp_group=dp_group, selection=selection, rule=rule
    )
    eps_low, eps_high = clip_bounds(rule.clip_ranges(), groups, logp, cfg)
    terms = token_terms(
        logp,
        old_logp,
        advantages,
        eps_low=eps_low,
        eps_high=eps_high,
        clip_c=cfg.clip_ratio_c,
        ref_logp=ref_logp,
        kl_estimator=cfg.kl_estimator,
    )

    pg_mask, denom = rule.gradient_mask(groups), rule.normalizer_mask(groups)
    pg_terms = terms.pg_loss
    if token_weights is not None:
        pg_terms = pg_terms * token_weights.detach().to(pg_terms.dtype)
    pg = aggregate(pg_terms, pg_mask, cfg.agg_mode, denom)

    kl_total = logp.new_zeros(()) if ref_logp is None else kl_term(terms.kl, groups, cfg, rule)
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


def clip_bounds(
    ranges: dict[str, tuple[float, float]], groups: dict[str, Tensor], like: Tensor, cfg: LossConfig
) -> tuple[Tensor | float, Tensor | float]:
    """(eps_low, eps_high) of each token: the rule's per-group ranges (`TokenRule.
    clip_ranges`) as [B, L] tensors the dtype of `like`, the algorithm's clip_low /
    clip_high where no listed group covers a token; floats when one range covers all."""
    if set(ranges) == {"all"}:
        return ranges["all"]
    low = torch.full_like(like, cfg.clip_low)
    high = torch.full_like(like, cfg.clip_high)
    for name, (lo, hi) in ranges.items():
        low = low.masked_fill(groups[name], lo)
        high = high.masked_fill(groups[name], hi)
    return low, high


def kl_term(
    kl: Tensor, groups: dict[str, Tensor], cfg: LossConfig, rule: TokenRule | None = None
) -> Tensor:
    """The KL penalty: sum over the rule's groups of coef * the group's aggregated
    per-token KL [B, L] (`TokenRule.kl_coefs`: Archer's knowledge and reasoning groups
    with their own coefficients; else kl_coef over all tokens); a coefficient of 0 adds
    nothing."""
    rule = token_rule_for(cfg) if rule is None else rule
    total = kl.new_zeros(())
    for name, coef in rule.kl_coefs().items():
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
    `policy_loss` counts them: for token-mean the tokens of the rule's normaliser
    (`TokenRule.normalizer_tokens`: the valid tokens, or e.g. forking's selected tokens,
    from the mini-batch's `selection` [B, L] or the micro-batches' masks
    `microbatch_masks` [b, Lm] each); for the seq-mean modes the responses."""
    mask = mask.bool()
    if cfg.agg_mode != "token-mean":
        return float(unit_count(mask, mask, cfg.agg_mode))
    return token_rule_for(cfg).normalizer_tokens(mask, selection, microbatch_masks)


def accumulation_normalizer(global_units: float, dp_size: int) -> float:
    """The `normalizer` each micro-batch's `policy_loss` takes: N_global / dp (at least
    1 / dp), N_global = `normalizer_units` summed over the data-parallel ranks. Megatron
    DDP averages gradients over the dp ranks, so with this the update is the gradient
    of the mini-batch loss sum-of-terms / N_global."""
    return max(global_units, 1.0) / dp_size
