"""Forking selection with mini-batch scope across 2 data-parallel ranks (gloo)."""

from __future__ import annotations

import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from archer_mcore.algo.token_groups import forking_mask


def _data() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(11)
    e = torch.rand(6, 9, generator=g)
    lengths = torch.tensor([9, 1, 4, 7, 2, 5])
    m = torch.arange(9).unsqueeze(0) < lengths.unsqueeze(1)
    return e, m


def _worker(rank: int, port: int, out: dict) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        e, m = _data()
        rows = slice(0, 3) if rank == 0 else slice(3, 6)
        out[rank] = forking_mask(e[rows], m[rows], 0.2, group=dist.group.WORLD)
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_minibatch_scope_over_dp_equals_single_process_selection():
    # 28 valid tokens in all -> k = ceil(5.6) = 6 across both ranks together.
    e, m = _data()
    out = mp.Manager().dict()
    mp.spawn(_worker, args=(_free_port(), out), nprocs=2, join=True)
    joined = torch.cat([out[0], out[1]])
    assert torch.equal(joined, forking_mask(e, m, 0.2))
    assert int(joined.sum()) == 6
    # Each rank alone would have chosen its own top-k instead: scope matters.
    assert not torch.equal(out[0], forking_mask(e[:3], m[:3], 0.2)) or not torch.equal(
        out[1], forking_mask(e[3:], m[3:], 0.2)
    )
