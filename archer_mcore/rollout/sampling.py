"""Next-token sampling with temperature, top-k and top-p: pure functions.

Semantics follow SGLang's sampler (the production engine), so that the local engine
and SGLang agree on what a sampling parameter means:
  1. s = z / T (T > 0); greedy (T = 0) takes argmax z.
  2. top-k keeps the k largest s (ties at the k-th value: the first k by sort order).
  3. top-p works on the top-k-renormalised probabilities sorted descending: token i is
     kept if the probability mass strictly before it is <= top_p (the most likely token
     is always kept; SGLang's rule, which at a mass exactly equal to top_p keeps one
     token more than transformers' TopPLogitsWarper).
  4. sample from the renormalised kept set.
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
    top_k <= 0 or >= V disables top-k; top_p >= 1 disables top-p.
    """
    vocab = probs.shape[-1]
    sorted_probs, order = probs.sort(dim=-1, descending=True, stable=True)
    keep_sorted = torch.ones_like(sorted_probs, dtype=torch.bool)
    if 0 < top_k < vocab:
        keep_sorted[:, top_k:] = False
    if top_p < 1.0:
        kept = sorted_probs * keep_sorted
        kept = kept / kept.sum(dim=-1, keepdim=True)
        mass_before = kept.cumsum(dim=-1) - kept
        keep_sorted &= mass_before <= top_p
    keep = torch.zeros_like(keep_sorted)
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
        tokens = torch.multinomial(kept, num_samples=1, generator=generator).squeeze(-1)
    logprobs = logp_all.gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
    return tokens, logprobs
