"""Rank helpers of the trainer: which process is rank 0, agreeing on a flag across
ranks, and handing rank 0's Python object (or its rollout, `broadcast_rollout`) to every
rank.

Each degrades to the single-process answer when torch.distributed is not initialised
(or the world has one rank), so the CPU demo needs no process group.

These are host-side collectives: their tensors live on the CPU. On a GPU job the
default group is NCCL, which serves CUDA tensors only ("No backend type associated
with device type cpu"), so they run on `control_group()`: one gloo group over all
ranks, created once (tests/train/test_collective_devices.py runs the loop with a
default group that serves only CUDA). It has a timeout of its own: the other ranks wait
in `broadcast_object` while rank 0 generates, scores and evaluates, which at the large
presets can take longer than the default group's timeout, after which NCCL's watchdog
would kill the job. `init_control_group` (with `parallel.rollout_wait_timeout_s`) sets
that bound; `parallel.collective_timeout_s` stays the default group's.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import timedelta
from typing import Any, TypeVar

import torch
import torch.distributed as dist

from archer_mcore.parallel.batch_transport import broadcast_samples

T = TypeVar("T")


def rank() -> int:
    """This process's global rank (0 without torch.distributed)."""
    return dist.get_rank() if dist.is_initialized() else 0


DEFAULT_WAIT_TIMEOUT_S = 6 * 3600.0  # parallel.rollout_wait_timeout_s's default
_wait_timeout_s = DEFAULT_WAIT_TIMEOUT_S
# (default group, control group) of this process; rebuilt if the default group changes
_control: tuple[Any, dist.ProcessGroup] | None = None


class RankWaitTimeout(RuntimeError):
    """A rank waited longer than `parallel.rollout_wait_timeout_s` for rank 0."""


def init_control_group(wait_timeout_s: float) -> None:
    """Set how long host-side collectives (the other ranks waiting for rank 0's
    rollout, scoring and evaluation) may wait, and make the control group now.
    Collective: call it on every rank at one point of start-up, where all ranks are
    together (made later, at the first wait, its connection would time out while rank
    0 is still generating)."""
    global _wait_timeout_s, _control
    _wait_timeout_s = float(wait_timeout_s)
    _control = None
    if is_distributed():
        control_group()


def control_group() -> dist.ProcessGroup:
    """The gloo group of all ranks for host-side (CPU tensor) collectives, with the
    wait timeout; made on first use. Collective: every rank calls it at the same point
    (as every helper here does)."""
    global _control
    world = dist.group.WORLD
    if _control is None or _control[0] is not world:
        group = dist.new_group(backend="gloo", timeout=timedelta(seconds=_wait_timeout_s))
        _control = (world, group)
    return _control[1]


def destroy_control_group() -> None:
    """Destroy the control group (every rank, at the end of a run, before the default
    group). Left to the interpreter's exit, a gloo group's threads can be torn down out
    of order and the process aborts ("terminate called without an active exception")."""
    global _control
    if _control is not None:
        group = _control[1]
        _control = None
        if dist.is_initialized():
            dist.destroy_process_group(group)


def _waiting(fn: Callable[[], T]) -> T:
    """Run a host-side collective; a gloo timeout becomes a RankWaitTimeout naming
    the setting (gloo says "Timed out waiting ... for recv")."""
    try:
        return fn()
    except RuntimeError as e:
        if "timed out" not in str(e).lower():
            raise
        raise RankWaitTimeout(
            f"rank {rank()} waited more than parallel.rollout_wait_timeout_s = "
            f"{_wait_timeout_s:g} s for rank 0 (its rollout, scoring or evaluation): set it "
            "above the longest step's generation time"
        ) from e


def is_distributed() -> bool:
    """True when torch.distributed runs with more than one rank."""
    return dist.is_initialized() and dist.get_world_size() > 1


def any_rank(flag: bool) -> bool:
    """True on every rank when `flag` is True on any rank (e.g. a signal that reached
    only some processes), so that collective decisions like a checkpoint agree."""
    if not is_distributed():
        return bool(flag)
    t = torch.tensor([1 if flag else 0], dtype=torch.int32)
    group = control_group()
    _waiting(lambda: dist.all_reduce(t, op=dist.ReduceOp.MAX, group=group))
    return bool(t.item())


def broadcast_object(obj: T) -> T:
    """Rank 0's `obj` on every rank (identity without torch.distributed), pickled."""
    if not is_distributed():
        return obj
    box: list[Any] = [obj]
    group = control_group()
    _waiting(lambda: dist.broadcast_object_list(box, src=0, group=group))
    return box[0]


def broadcast_rollout(obj: T) -> T:
    """Rank 0's rollout `obj` (scored groups, a SamplingOutcome: anything holding
    `Sample`s) on every rank; the samples' token ids and log-probs travel as flat
    int32 / float32 arrays, the rest pickled (parallel/batch_transport.py). Equal to
    `broadcast_object(obj)` on every rank; identity without torch.distributed."""
    if not is_distributed():
        return obj
    group = control_group()
    return _waiting(lambda: broadcast_samples(obj, group))
