"""Rank helpers of the trainer: which process is rank 0, agreeing on a flag across
ranks, and handing rank 0's Python object to every rank.

Each degrades to the single-process answer when torch.distributed is not initialised
(or the world has one rank), so the CPU demo needs no process group.

These are host-side collectives: their tensors live on the CPU. On a GPU job the
default group is NCCL, which serves CUDA tensors only ("No backend type associated
with device type cpu"), so they run on `control_group()`: the default group where its
backend serves the CPU (gloo, or a "cpu:gloo,cuda:nccl" config), otherwise one gloo
group over all ranks, created once. Every host-side collective of the trainer goes
through this module (tests/train/test_collective_devices.py runs the loop with a
default group that serves only CUDA).
"""

from __future__ import annotations

from typing import Any, TypeVar

import torch
import torch.distributed as dist

T = TypeVar("T")


def rank() -> int:
    """This process's global rank (0 without torch.distributed)."""
    return dist.get_rank() if dist.is_initialized() else 0


def serves_cpu(group: dist.ProcessGroup | None = None) -> bool:
    """True if `group`'s backend takes CPU tensors ("gloo" is configured as
    "cpu:gloo,cuda:gloo", "nccl" as "cuda:nccl")."""
    config = str(dist.get_backend_config(group))
    return any(part.split(":", 1)[0] == "cpu" for part in config.split(","))


# (default group, control group) of this process; rebuilt if the default group changes
_control: tuple[Any, dist.ProcessGroup | None] | None = None


def control_group() -> dist.ProcessGroup | None:
    """The group for host-side (CPU tensor) collectives over all ranks: None (the
    default group) when that serves the CPU, else a gloo group made on first use.
    Collective: every rank calls it at the same point (as every helper here does)."""
    global _control
    world = dist.group.WORLD
    if _control is None or _control[0] is not world:
        _control = (world, None if serves_cpu() else dist.new_group(backend="gloo"))
    return _control[1]


def is_distributed() -> bool:
    """True when torch.distributed runs with more than one rank."""
    return dist.is_initialized() and dist.get_world_size() > 1


def any_rank(flag: bool) -> bool:
    """True on every rank when `flag` is True on any rank (e.g. a signal that reached
    only some processes), so that collective decisions like a checkpoint agree."""
    if not is_distributed():
        return bool(flag)
    t = torch.tensor([1 if flag else 0], dtype=torch.int32)
    dist.all_reduce(t, op=dist.ReduceOp.MAX, group=control_group())
    return bool(t.item())


def broadcast_object(obj: T) -> T:
    """Rank 0's `obj` on every rank (identity without torch.distributed), pickled."""
    if not is_distributed():
        return obj
    box: list[Any] = [obj]
    dist.broadcast_object_list(box, src=0, group=control_group())
    return box[0]

