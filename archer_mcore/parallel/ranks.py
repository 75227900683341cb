"""Rank helpers of the trainer: which process is rank 0, agreeing on a flag across
ranks, and handing rank 0's Python object to every rank.

Each degrades to the single-process answer when torch.distributed is not initialised
(or the world has one rank), so the CPU demo needs no process group.
"""

from __future__ import annotations

from typing import Any, TypeVar

import torch
import torch.distributed as dist

T = TypeVar("T")


def rank() -> int:
    """This process's global rank (0 without torch.distributed)."""
    return dist.get_rank() if dist.is_initialized() else 0


def any_rank(flag: bool) -> bool:
    """True on every rank when `flag` is True on any rank (e.g. a signal that reached
    only some processes), so that collective decisions like a checkpoint agree."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return bool(flag)
    t = torch.tensor([1 if flag else 0], dtype=torch.int32)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def broadcast_object(obj: T) -> T:
    """Rank 0's `obj` on every rank (identity without torch.distributed)."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return obj
    box: list[Any] = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]
