"""Token entropy and sampled-token log-prob from logits: the torch reference.

Both come from one pass over each row's softmax p = softmax(z / T):

    logprob_t = z_y / T - logsumexp(z / T)
    H_t       = logsumexp(z / T) - sum_v p_v z_v / T

The math is fp32 for fp32/bf16/fp16 logits (fp64 for fp64 logits, so that the
reference can be gradient-checked). Rows are processed in chunks, in the
forward and again in the backward (which recomputes the softmax of one chunk at a
time), so the extra memory is O(chunk_rows x V) however many tokens there are. This is
the reference the fused GPU kernels in `archer_mcore.kernels` must match.
"""

from __future__ import annotations

import torch
from torch import Tensor


def _math_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _chunk_stats(z: Tensor, y: Tensor, temperature: float) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(max, lse, entropy, logprob) of s = z / T for one chunk of rows, shapes [n].

    Works on s - max(s) so that H = lse' - E_p[s - max] does not cancel large numbers.
    """
    s = z.to(_math_dtype(z.dtype)) / temperature
    m = s.amax(dim=-1, keepdim=True)
    sh = s - m
    lse_sh = torch.log(torch.exp(sh).sum(-1))
    p = torch.exp(sh - lse_sh.unsqueeze(-1))
    entropy = lse_sh - (p * sh).sum(-1)
    logprob = sh.gather(-1, y.unsqueeze(-1)).squeeze(-1) - lse_sh
    m = m.squeeze(-1)
    return m, m + lse_sh, entropy, logprob


class _EntropyLogprob(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits: Tensor, tokens: Tensor, temperature: float, chunk_rows: int):
        n = logits.shape[0]
        kw = {"dtype": _math_dtype(logits.dtype), "device": logits.device}
        entropy, logprob = torch.empty(n, **kw), torch.empty(n, **kw)
        max_all, lse_all = torch.empty(n, **kw), torch.empty(n, **kw)
        for lo in range(0, n, chunk_rows):
            hi = min(lo + chunk_rows, n)
            m, lse, h, lp = _chunk_stats(logits[lo:hi], tokens[lo:hi], temperature)
            max_all[lo:hi], lse_all[lo:hi], entropy[lo:hi], logprob[lo:hi] = m, lse, h, lp
        ctx.save_for_backward(logits, tokens, max_all, lse_all, entropy)
        ctx.temperature = temperature
        ctx.chunk_rows = chunk_rows
        return entropy, logprob

    @staticmethod
    def backward(ctx, grad_entropy: Tensor | None, grad_logprob: Tensor | None):
        logits, tokens, max_all, lse_all, entropy = ctx.saved_tensors
        grad_entropy = torch.zeros_like(entropy) if grad_entropy is None else grad_entropy
        grad_logprob = torch.zeros_like(entropy) if grad_logprob is None else grad_logprob
        t, chunk = ctx.temperature, ctx.chunk_rows
        grad_logits = torch.empty_like(logits)
        # dH/ds_v = -p_v (s_v - E_p[s]);  dlogp/ds_v = 1[v = y] - p_v;  ds/dz = 1/T.
        for lo in range(0, logits.shape[0], chunk):
            hi = min(lo + chunk, logits.shape[0])
            m = max_all[lo:hi].unsqueeze(-1)
            sh = logits[lo:hi].to(lse_all.dtype) / t - m
            lse_sh = lse_all[lo:hi].unsqueeze(-1) - m
            p = torch.exp(sh - lse_sh)
            centred = sh - (lse_sh - entropy[lo:hi].unsqueeze(-1))  # s - E_p[s]
            g_h = grad_entropy[lo:hi].to(lse_all.dtype).unsqueeze(-1)
            g_l = grad_logprob[lo:hi].to(lse_all.dtype).unsqueeze(-1)
            g = -g_h * p * centred - g_l * p
            g.scatter_add_(-1, tokens[lo:hi].unsqueeze(-1), g_l)
            grad_logits[lo:hi] = (g / t).to(logits.dtype)
        return grad_logits, None, None, None


def entropy_and_logprob(
    logits: Tensor, tokens: Tensor, temperature: float = 1.0, chunk_rows: int = 2048
) -> tuple[Tensor, Tensor]:
    """Entropy of softmax(logits / T) and the log-prob of `tokens` under it.

    Args:
        logits: [..., V] any float dtype.
        tokens: [...] int64 token ids in [0, V).
        temperature: the rollout sampling temperature T (> 0).
        chunk_rows: rows processed at once; bounds the fp32 scratch memory.
    Returns:
        (entropy, logprob), each [...] float32 (float64 for float64 logits), in nats. Differentiable w.r.t. logits.
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if logits.shape[:-1] != tokens.shape:
        raise ValueError(f"logits {tuple(logits.shape)} and tokens {tuple(tokens.shape)} differ")
    lead = tokens.shape
    flat_logits = logits.reshape(-1, logits.shape[-1])
    flat_tokens = tokens.reshape(-1).long()
    entropy, logprob = _EntropyLogprob.apply(
        flat_logits, flat_tokens, float(temperature), max(1, int(chunk_rows))
    )
    return entropy.reshape(lead), logprob.reshape(lead)
