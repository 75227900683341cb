"""Next-token sampling with temperature, top-k and top-p: pure functions.

Semantics follow SGLang's sampler (the production engine), so that the local engine
and SGLang agree on what a sampling parameter means:
  1. s = z / T (T > 0); greedy (T = 0) takes argmax z.
  2. top-k keeps the k largest s (exactly k; ties at the k-th value broken by topk).
  3. top-p works on the top-k-renormalised probabilities sorted descending: token i is
     kept if the probability mass strictly before it is <= top_p (the most likely token
     is always kept; SGLang's rule, which at a mass exactly equal to top_p keeps one
     token more than transformers' TopPLogitsWarper).
  4. sample from the renormalised kept set (exponential race, as SGLang/vLLM do).
The returned log-prob is log softmax(s) at the sampled id, over the *full* vocabulary,
i.e. before top-k/top-p truncation (SGLang's default, SGLANG_RETURN_ORIGINAL_LOGPROB
unset); for greedy it is log softmax(z).
"""

from __future__ import annotations

import torch
from torch import Tensor


def truncation_mask(probs: Tensor, top_k: int, top_p: float) -> Tensor:
    """Which tokens survive top-k then top-p.

    probs: [B, V] probabilities (rows sum to 1). Returns a bool mask [B, V], True = kept.
    top_k <= 0 or >= V disables top-k; top_p >= 1 disables top-p. Ties at the k-th
    value are broken by torch.topk (exactly k tokens are kept).
    """
    vocab = probs.shape[-1]
    use_k = 0 < top_k < vocab
    if not use_k and top_p >= 1.0:
        return torch.ones_like(probs, dtype=torch.bool)
    if use_k:
        sorted_probs, order = probs.topk(top_k, dim=-1, sorted=True)
    else:
        sorted_probs, order = probs.sort(dim=-1, descending=True)
    keep_sorted = torch.ones_like(sorted_probs, dtype=torch.bool)
    if top_p < 1.0:
        kept = sorted_probs / sorted_probs.sum(dim=-1, keepdim=True)
        mass_before = kept.cumsum(dim=-1) - kept
        keep_sorted = mass_before <= top_p
    keep = torch.zeros_like(probs, dtype=torch.bool)
    keep.scatter_(-1, order, keep_sorted)
    return keep


def sample_next_tokens(
    logits: Tensor,
    temperature: float,
    top_k: int,
    top_p: float,
    generator: torch.Generator | None = None,
) -> tuple[Tensor, Tensor]:
    """Sample one token per row and return (token_ids [B] int64, logprobs [B] float32).

    logits: [B, V] raw logits z of the next position (any float dtype; math in fp32).
    logprobs[b] = log softmax(z_b / T)[token_b] over the full vocabulary (T = 1 if greedy).
    """
    z = logits.float()
    if temperature == 0.0:
        tokens = z.argmax(dim=-1)
        logp_all = torch.log_softmax(z, dim=-1)
    else:
        logp_all = torch.log_softmax(z / temperature, dim=-1)
        probs = logp_all.exp()
        keep = truncation_mask(probs, top_k, top_p)
        kept = torch.where(keep, probs, torch.zeros_like(probs))
        # exponential race: argmax_v p_v / E_v with E_v ~ Exp(1) is a draw from p
        # (normalisation does not matter), cheaper than torch.multinomial on wide rows
        race = torch.empty_like(kept).exponential_(generator=generator)
        race.clamp_(min=torch.finfo(race.dtype).tiny)  # a 0 draw would make 0/0 = NaN
        tokens = (kept / race).argmax(dim=-1)
    logprobs = logp_all.gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
    return tokens, logprobs
