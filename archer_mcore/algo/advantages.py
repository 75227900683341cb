"""Advantages and reward shaping: GRPO, DAPO's overlong punishment, the group filter.

Rewards come as [G, n]: G prompts (groups), n responses each.
"""

from __future__ import annotations

import torch
from torch import Tensor


def grpo_advantages(rewards: Tensor, norm_by_std: bool = True, eps: float = 1e-6) -> Tensor:
    """Group-relative advantages A = (R - mean_group) / (std_group + eps).

    Args:
        rewards: [G, n] scalar rewards.
        norm_by_std: divide by the unbiased group std (Dr.GRPO-style when False).
    Returns:
        [G, n] float32 advantages; a group of one response gets 0.
    """
    r = rewards.float()
    if r.dim() != 2:
        raise ValueError(f"rewards must be [groups, responses], got shape {tuple(r.shape)}")
    centred = r - r.mean(dim=-1, keepdim=True)
    if r.shape[-1] < 2:
        return torch.zeros_like(r)
    if norm_by_std:
        centred = centred / (r.std(dim=-1, unbiased=True, keepdim=True) + eps)
    return centred


def overlong_penalty(lengths: Tensor, max_length: int = 20480, cache_length: int = 4096) -> Tensor:
    """DAPO's soft overlong punishment added to the reward.

    0 for L <= Lmax - Lcache, then (Lmax - Lcache - L) / Lcache down to -1 at Lmax, and -1
    beyond. `lengths` [...] in tokens; returns float32 of the same shape.
    """
    if cache_length <= 0 or cache_length > max_length:
        raise ValueError(f"need 0 < cache_length <= max_length, got {cache_length}, {max_length}")
    expected = max_length - cache_length
    over = (lengths.float() - expected).clamp(min=0.0)
    return -(over / cache_length).clamp(max=1.0)


def group_keep_mask(scores: Tensor) -> Tensor:
    """DAPO's dynamic-sampling filter: keep groups whose scores have non-zero std.

    Args:
        scores: [G, n] per-response accuracy (or reward).
    Returns:
        [G] bool; all-correct and all-wrong groups (and groups of one) are dropped.
    """
    if scores.shape[-1] < 2:
        return torch.zeros(scores.shape[0], dtype=torch.bool, device=scores.device)
    return scores.float().std(dim=-1, unbiased=True) > 0
