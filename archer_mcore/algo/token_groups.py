"""Token groups by entropy: Archer's knowledge/reasoning split and forking-token selection.

All functions take entropies [B, L] (fp32, detached) and a validity mask [B, L] (True on
real response tokens, False on padding) and return boolean masks [B, L]. Padding is
never in any group.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
from torch import Tensor


def archer_quantile(entropy: Tensor, mask: Tensor, quantile: float = 0.8) -> Tensor:
    """Per-response q-quantile of valid-token entropies, linear interpolation.

    Same as `torch.nanquantile` over each row with padding set to NaN.
    Returns [B] float32; NaN for a response without valid tokens.
    """
    e = entropy.detach().float().masked_fill(~mask, float("nan"))
    return torch.nanquantile(e, quantile, dim=-1)


def archer_reasoning_mask(entropy: Tensor, mask: Tensor, quantile: float = 0.8) -> Tensor:
    """Reasoning tokens: valid tokens strictly above their response's entropy quantile.

    Ties with the quantile go to knowledge, so a 1-token response has no reasoning token.
    Knowledge tokens are `mask & ~reasoning`.
    """
    tau = archer_quantile(entropy, mask, quantile)
    return mask & (entropy.detach().float() > tau.unsqueeze(-1))


def forking_k(n_valid: int, rho: float = 0.2) -> int:
    """Number of forking tokens among `n_valid` tokens: max(1, ceil(rho * N)); 0 if N = 0."""
    if n_valid <= 0:
        return 0
    # round() first so that e.g. 0.2 * 15 = 3.0000000000000004 does not ceil to 4.
    return max(1, math.ceil(round(rho * n_valid, 9)))


def _top_k_mask(values: Tensor, k: int) -> Tensor:
    """Boolean mask of the k largest entries of a 1-D tensor; ties broken by position."""
    order = torch.sort(values, descending=True, stable=True).indices[:k]
    out = torch.zeros_like(values, dtype=torch.bool)
    out[order] = True
    return out


def forking_mask(
    entropy: Tensor, mask: Tensor, rho: float = 0.2, group: dist.ProcessGroup | None = None
) -> Tensor:
    """Forking tokens: the top k = max(1, ceil(rho N)) entropies of the N valid tokens.

    The scope is everything passed in (a micro-batch), or, with `group`, the union of the
    tensors on all ranks of that data-parallel group (a mini-batch across DP ranks); then
    every rank returns the mask of its own tokens and exactly k are selected in all.
    Ties are broken by position (rank, then row-major order), deterministically.
    """
    e = entropy.detach().float()
    local = e[mask]
    if group is None or dist.get_world_size(group) == 1:
        selected = _top_k_mask(local, forking_k(local.numel(), rho))
    else:
        world, rank = dist.get_world_size(group), dist.get_rank(group)
        dev = e.device  # NCCL needs device tensors, gloo takes CPU ones: use the inputs'
        counts = [torch.zeros(1, dtype=torch.long, device=dev) for _ in range(world)]
        size = torch.tensor([local.numel()], dtype=torch.long, device=dev)
        dist.all_gather(counts, size, group=group)
        sizes = [int(c.item()) for c in counts]
        width = max(1, *sizes)
        padded = torch.full((width,), float("-inf"), device=dev)
        padded[: local.numel()] = local
        gathered = [torch.empty(width, device=dev) for _ in range(world)]
        dist.all_gather(gathered, padded, group=group)
        everything = torch.cat([g[:s] for g, s in zip(gathered, sizes)])
        chosen = _top_k_mask(everything, forking_k(everything.numel(), rho))
        start = sum(sizes[:rank])
        selected = chosen[start : start + local.numel()]
    out = torch.zeros_like(mask)
    out[mask] = selected
    return out


def forking_mask_of_rows(entropy: Tensor, mask: Tensor, rows: Tensor, rho: float = 0.2) -> Tensor:
    """Forking tokens chosen over the rows `rows` of a batch taken together.

    `entropy` and `mask` are [B, L] over the whole batch; the result is [B, L] bool with
    the top k = max(1, ceil(rho N)) of the N valid tokens in `rows` set (ties by
    position in `rows` order, then by column) and every other row all False. This is the
    mini-batch scope when `rows` is one mini-batch (every data-parallel rank's share).
    """
    out = torch.zeros_like(mask, dtype=torch.bool)
    out[rows] = forking_mask(entropy[rows], mask[rows].bool(), rho)
    return out
