"""Trainer side of the weight sync to rollout servers.

Broadcast path: the trainer (rank 0) and every server TP worker form a process group of
their own, built the way SGLang's `init_custom_process_group` builds the receiving side
(TCP rendezvous at master_address:master_port, store prefixed by the group name,
torch's `_new_process_group_helper`), so the store keys and the communicator match.
The backend is a parameter: "nccl" on GPUs, "gloo" in CPU tests.

Disk path: write the weights as an HF checkpoint (sharded safetensors + index + the
base model's config/tokenizer files) that `/update_weights_from_disk` loads.
"""

from __future__ import annotations

import inspect
import json
import shutil
from collections.abc import Iterable, Iterator
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors.torch import save_file
from torch import Tensor

from archer_mcore.rollout.types import NamedTensorBucket, RolloutError

WEIGHT_FILE_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")
INDEX_FILE = "model.safetensors.index.json"


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


def write_hf_checkpoint(
    buckets: Iterable[NamedTensorBucket], out_dir: Path, base_model_dir: Path | None
) -> list[str]:
    """Write buckets as `model-00001-of-0000N.safetensors` shards plus the HF index, and
    copy the base model directory's non-weight files (config.json, tokenizer, ...).
    Returns the parameter names written. The directory is written to a temporary
    sibling and renamed, so a reader never sees a half-written checkpoint."""
    out_dir = Path(out_dir)
    tmp = out_dir.with_name(out_dir.name + ".partial")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    if base_model_dir is not None:
        base = Path(base_model_dir)
        if not (base / "config.json").is_file():
            raise RolloutError(f"base model directory {base} has no config.json")
        for f in base.iterdir():
            if f.is_file() and not f.name.endswith(WEIGHT_FILE_SUFFIXES) and f.name != INDEX_FILE:
                shutil.copy2(f, tmp / f.name)
    shard_names: list[tuple[str, list[str]]] = []
    total_bytes = 0
    for k, bucket in enumerate(b for b in buckets if b):
        tensors: dict[str, Tensor] = {}
        for name, t in bucket:
            if name in tensors:
                raise RolloutError(f"weight bucket {k} repeats parameter {name!r}")
            tensors[name] = t.detach().to("cpu").contiguous()
            total_bytes += t.numel() * t.element_size()
        fname = f"shard-{k:05d}.safetensors"
        save_file(tensors, str(tmp / fname), metadata={"format": "pt"})
        shard_names.append((fname, list(tensors)))
    if not shard_names:
        shutil.rmtree(tmp)
        raise RolloutError("weight update had no tensors")
    n = len(shard_names)
    weight_map: dict[str, str] = {}
    for k, (fname, names) in enumerate(shard_names):
        final = f"model-{k + 1:05d}-of-{n:05d}.safetensors"
        (tmp / fname).rename(tmp / final)
        for name in names:
            if name in weight_map:
                raise RolloutError(f"weight update repeats parameter {name!r} across buckets")
            weight_map[name] = final
    index = {"metadata": {"total_size": total_bytes}, "weight_map": weight_map}
    (tmp / INDEX_FILE).write_text(json.dumps(index, indent=1))
    if out_dir.exists():
        shutil.rmtree(out_dir)
    tmp.rename(out_dir)
    return list(weight_map)
