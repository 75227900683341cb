"""Trainer side of the weight sync to rollout servers.

Broadcast path: the trainer (rank 0) and every server TP worker form a process group of
their own, built the way SGLang's `init_custom_process_group` builds the receiving side
(TCP rendezvous at master_address:master_port, store prefixed by the group name,
torch's `_new_process_group_helper`), so the store keys and the communicator match.
The backend is a parameter: "nccl" on GPUs, "gloo" in CPU tests.

Disk path: the weights are written as an HF checkpoint (sharded safetensors + index +
the base model's config/tokenizer files) by `archer_mcore.model.hf_io.write_hf_checkpoint`,
which `/update_weights_from_disk` then loads.
"""

from __future__ import annotations

import inspect
from collections.abc import Iterable, Iterator
from datetime import timedelta

import torch
import torch.distributed as dist

from archer_mcore.rollout.types import NamedTensorBucket


def dtype_name(dtype: torch.dtype) -> str:
    """torch.bfloat16 -> "bfloat16": the dtype strings SGLang's update request takes."""
    return str(dtype).removeprefix("torch.")


def bucket_metadata(bucket: NamedTensorBucket) -> tuple[list[str], list[str], list[list[int]]]:
    """(names, dtypes, shapes) of one bucket, in broadcast order."""
    return (
        [name for name, _ in bucket],
        [dtype_name(t.dtype) for _, t in bucket],
        [list(t.shape) for _, t in bucket],
    )


def with_last_flag(
    buckets: Iterable[NamedTensorBucket],
) -> Iterator[tuple[NamedTensorBucket, bool]]:
    """Yield (bucket, is_last) with one bucket of look-ahead; empty buckets are skipped."""
    it = (b for b in buckets if len(b) > 0)
    prev = next(it, None)
    for cur in it:
        yield prev, False  # type: ignore[misc]
        prev = cur
    if prev is not None:
        yield prev, True


def init_weight_update_group(
    backend: str,
    master_address: str,
    master_port: int,
    rank: int,
    world_size: int,
    group_name: str,
    timeout_s: float = 600.0,
) -> dist.ProcessGroup:
    """Join (rank 0: create) the weight-update group. Blocks until all ranks arrive."""
    from torch.distributed.distributed_c10d import (
        Backend,
        PrefixStore,
        _new_process_group_helper,
        _world,
        rendezvous,
    )

    timeout = timedelta(seconds=timeout_s)
    store, rank, world_size = next(
        rendezvous(f"tcp://{master_address}:{master_port}", rank, world_size, timeout=timeout)
    )
    store.set_timeout(timeout)
    store = PrefixStore(group_name, store)
    params = inspect.signature(_new_process_group_helper).parameters
    options_kw = "backend_options" if "backend_options" in params else "pg_options"
    pg, _ = _new_process_group_helper(
        world_size, rank, [], Backend(backend), store, group_name=group_name,
        timeout=timeout, **{options_kw: None},
    )  # fmt: skip
    _world.pg_group_ranks[pg] = {i: i for i in range(world_size)}
    return pg


def destroy_weight_update_group(pg: dist.ProcessGroup | None) -> None:
    if pg is not None:
        dist.destroy_process_group(pg)


def broadcast_bucket(
    pg: dist.ProcessGroup, bucket: NamedTensorBucket, device: torch.device
) -> None:
    """Broadcast each tensor of the bucket from rank 0, in order (receivers allocate
    empty tensors from the request's names/dtypes/shapes and receive in the same order)."""
    for _, tensor in bucket:
        t = tensor.detach().to(device).contiguous()
        dist.broadcast(t, src=0, group=pg)
