"""Trainer side of the weight sync to rollout servers.

Broadcast path: the trainer (rank 0) and every server TP worker form a process group of
their own, built the way SGLang's `init_custom_process_group` builds the receiving side
(0.5.23 `sglang/srt/utils/common.py`: a TCP store at master_address:master_port, wrapped
in `PrefixStore(group_name, ...)`, then torch's `_new_process_group_helper`), so the
store keys and the communicator match. The backend is a parameter: "nccl" on GPUs,
"gloo" in CPU tests.

Rank 0 hosts the store itself: `TCPStore(..., is_master=True)` over a socket this module
binds to the advertised master address (`bind_rendezvous`), handed over with
`master_listen_fd`. Not torch's `rendezvous("tcp://...")`: under torchrun every worker has
TORCHELASTIC_USE_AGENT_STORE=True and that builds a client-only store even on rank 0
(nothing listens; the trainer and every server time out), and its store server listens
on every interface (`::`) whatever host it is given. The store lives as long as the
group (the group holds it); it has no authentication, so it is reachable from wherever
the master address is.

Disk path: the weights are written as an HF checkpoint (sharded safetensors + index +
the base model's config/tokenizer files) by `archer_mcore.model.hf_io.write_hf_checkpoint`,
which `/update_weights_from_disk` then loads.
"""

from __future__ import annotations

import inspect
import socket
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


def bind_rendezvous(host: str, port: int = 0) -> socket.socket:
    """A listening TCP socket on host:port only (port 0: a free port, read it back with
    getsockname()), for the weight-update group's store on rank 0."""
    family, kind, proto, _, addr = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(addr)
        sock.listen(128)
    except OSError:
        sock.close()
        raise
    return sock


def _group_store(
    master_address: str,
    master_port: int,
    *,
    rank: int,
    world_size: int,
    timeout: timedelta,
    listener: socket.socket | None,
) -> dist.TCPStore:
    """Rank 0: the store server on `listener` (bound here when None); other ranks: a
    client of it. Independent of torchrun's TORCHELASTIC_USE_AGENT_STORE."""
    if rank != 0:
        return dist.TCPStore(
            master_address, master_port, world_size, is_master=False, timeout=timeout
        )
    sock = listener if listener is not None else bind_rendezvous(master_address, master_port)
    port = int(sock.getsockname()[1])
    # the store takes the descriptor over (and closes it): detach it from the socket object
    return dist.TCPStore(
        master_address,
        port,
        world_size,
        is_master=True,
        timeout=timeout,
        wait_for_workers=False,
        master_listen_fd=sock.detach(),
    )


def init_weight_update_group(
    backend: str,
    *,
    master_address: str,
    master_port: int,
    rank: int,
    world_size: int,
    group_name: str,
    timeout_s: float = 600.0,
    listener: socket.socket | None = None,
) -> dist.ProcessGroup:
    """Join (rank 0: create) the weight-update group. Blocks until all ranks arrive.

    Rank 0 serves the group's store on `listener` (a socket from `bind_rendezvous`, which
    it takes over), else on a socket bound to master_address:master_port here."""
    from torch.distributed.distributed_c10d import (
        Backend,
        PrefixStore,
        _new_process_group_helper,
        _world,
    )

    timeout = timedelta(seconds=timeout_s)
    base = _group_store(
        master_address,
        master_port,
        rank=rank,
        world_size=world_size,
        timeout=timeout,
        listener=listener,
    )
    base.set_timeout(timeout)
    store = PrefixStore(group_name, base)
    params = inspect.signature(_new_process_group_helper).parameters
    options_kw = "backend_options" if "backend_options" in params else "pg_options"
    pg, _ = _new_process_group_helper(
        world_size,
        rank,
        [],
        Backend(backend),
        store,
        group_name=group_name,
        timeout=timeout,
        **{options_kw: None},
    )
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
