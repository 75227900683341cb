"""Vocab-parallel forms at TP=2 (gloo, 2 spawned processes) equal the single-rank
kernels and the float64 reference: entropy / log-prob and their gradients from
vocab-sharded logits (kernel 1) and from a vocab-sharded output weight (kernel 2)."""

from __future__ import annotations

import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from archer_mcore.kernels.entropy_logprob import (
    entropy_and_logprob,
    vocab_parallel_entropy_and_logprob,
)
from archer_mcore.kernels.fused_lm_head import fused_lm_head_entropy_logprob
from kernel_reference64 import entropy_logprob64, rel_err

from archer_mcore.actor.kernel_dispatch import lm_head_entropy_and_logprob

N, V, H, T = 9, 130, 16, 0.9
V_HEAD = 600


def _data():
    g = torch.Generator().manual_seed(7)
    logits = torch.randn(N, V, generator=g) * 3
    tokens = torch.randint(0, V, (N,), generator=g)
    tokens[:2] = torch.tensor([0, V - 1])  # first and last id: one on each shard
    hidden = torch.randn(N, H, generator=g)
    weight = torch.randn(V_HEAD, H, generator=g) / H**0.25
    head_tokens = torch.randint(0, V_HEAD, (N,), generator=g)
    up = torch.randn(2, N, generator=g)
    return logits, tokens, hidden, weight, head_tokens, up


def _fwd_bwd_logits(fn, logits, tokens, up, **kw):
    z = logits.clone().requires_grad_()
    ent, lp = fn(z, tokens, T, **kw)
    (ent * up[0] + lp * up[1]).sum().backward()
    return ent.detach(), lp.detach(), z.grad


def _fwd_bwd_head(hidden, weight, tokens, up, fn=fused_lm_head_entropy_logprob, **kw):
    h = hidden.clone().requires_grad_()
    w = weight.clone().requires_grad_()
    ent, lp = fn(h, w, tokens, T, **kw)
    (ent * up[0] + lp * up[1]).sum().backward()
    return ent.detach(), lp.detach(), h.grad, w.grad


def _worker(rank: int, port: int, out: dict) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        logits, tokens, hidden, weight, head_tokens, up = _data()
        group = dist.group.WORLD
        half = V // 2  # default vocab_start = rank * V_local
        shard = logits[:, rank * half : (rank + 1) * half].contiguous()
        out[("logits", rank)] = _fwd_bwd_logits(
            vocab_parallel_entropy_and_logprob, shard, tokens, up, group=group
        )
        # Uneven shards with explicit starts: 50 / 80 columns.
        lo, hi = (0, 50) if rank == 0 else (50, V)
        uneven = logits[:, lo:hi].contiguous()
        out[("uneven", rank)] = _fwd_bwd_logits(
            vocab_parallel_entropy_and_logprob, uneven, tokens, up, group=group, vocab_start=lo
        )
        # Megatron vocab padding: ids >= 120 are not tokens (rank 1 holds 55 real ones).
        padded = logits.clone()
        padded[:, 120:] = 1e4
        out[("padded", rank)] = _fwd_bwd_logits(
            vocab_parallel_entropy_and_logprob,
            padded[:, rank * half : (rank + 1) * half].contiguous(),
            tokens % 120, up, group=group, vocab_size=120,
        )  # fmt: skip
        # Rank 1's whole shard is padding (vocab_size = 65 = rank 0's width).
        out[("all_pad", rank)] = _fwd_bwd_logits(
            vocab_parallel_entropy_and_logprob, shard, tokens % 65, up, group=group,
            vocab_size=65,
        )  # fmt: skip
        w_half = V_HEAD // 2
        w_shard = weight[rank * w_half : (rank + 1) * w_half]
        out[("head", rank)] = _fwd_bwd_head(
            hidden, w_shard, head_tokens, up, group=group, chunk_cols=128
        )
        # The dispatcher's torch path (materialised logits, torch vocab-parallel).
        out[("head_torch", rank)] = _fwd_bwd_head(
            hidden, w_shard, head_tokens, up, fn=lm_head_entropy_and_logprob,
            tp_group=group, mode="torch",
        )  # fmt: skip
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_tp2_equals_single_rank_and_float64():
    out = mp.Manager().dict()
    mp.spawn(_worker, args=(_free_port(), out), nprocs=2, join=True)
    logits, tokens, hidden, weight, head_tokens, up = _data()

    single = _fwd_bwd_logits(entropy_and_logprob, logits, tokens, up)
    ref = _fwd_bwd_logits(entropy_logprob64, logits.double(), tokens, up.double())
    for name in ("logits", "uneven"):
        r0, r1 = out[(name, 0)], out[(name, 1)]
        for i in (0, 1):  # entropy and log-prob: the same on both ranks, = single rank
            assert torch.equal(r0[i], r1[i])
            assert torch.allclose(r0[i], single[i], rtol=1e-6, atol=1e-6)
            assert rel_err(r0[i], ref[i]) < 1e-5
        grad = torch.cat([r0[2], r1[2]], dim=1)  # each rank holds its shard's gradient
        assert torch.allclose(grad, single[2], rtol=1e-6, atol=1e-7)
        assert rel_err(grad, ref[2]) < 1e-5

    ref = _fwd_bwd_logits(entropy_logprob64, logits[:, :120].double(), tokens % 120, up.double())
    r0, r1 = out[("padded", 0)], out[("padded", 1)]
    assert rel_err(r0[0], ref[0]) < 1e-5 and rel_err(r1[1], ref[1]) < 1e-5
    grad = torch.cat([r0[2], r1[2]], dim=1)
    assert rel_err(grad[:, :120], ref[2]) < 1e-5 and grad[:, 120:].abs().max() == 0

    ref = _fwd_bwd_logits(entropy_logprob64, logits[:, :65].double(), tokens % 65, up.double())
    r0, r1 = out[("all_pad", 0)], out[("all_pad", 1)]
    assert rel_err(r1[0], ref[0]) < 1e-5 and rel_err(r1[1], ref[1]) < 1e-5
    assert rel_err(r0[2], ref[2]) < 1e-5 and r1[2].abs().max() == 0

    single = _fwd_bwd_head(hidden, weight, head_tokens, up, chunk_cols=128)
    h64 = hidden.double().requires_grad_()
    w64 = weight.double().requires_grad_()
    ent64, lp64 = entropy_logprob64(h64 @ w64.T, head_tokens, T)
    (ent64 * up[0] + lp64 * up[1]).sum().backward()
    r0, r1 = out[("head", 0)], out[("head", 1)]
    for i, want in ((0, ent64), (1, lp64)):
        assert torch.equal(r0[i], r1[i])
        assert torch.allclose(r0[i], single[i], rtol=1e-6, atol=1e-6)
        assert rel_err(r0[i], want) < 1e-5
    # grad_hidden is all-reduced: complete and equal on both ranks.
    assert torch.equal(r0[2], r1[2])
    assert rel_err(r0[2], h64.grad) < 1e-5
    grad_w = torch.cat([r0[3], r1[3]])
    assert torch.allclose(grad_w, single[3], rtol=1e-5, atol=1e-7)
    assert rel_err(grad_w, w64.grad) < 1e-5

    # The torch fallback agrees with the kernels at TP=2 (grad_hidden all-reduced too).
    t0, t1 = out[("head_torch", 0)], out[("head_torch", 1)]
    for got, want in zip((t0[0], t0[1], t0[2], t1[2]), (r0[0], r0[1], r0[2], r1[2])):
        assert torch.allclose(got, want, rtol=1e-5, atol=1e-6)
    assert torch.allclose(torch.cat([t0[3], t1[3]]), grad_w, rtol=1e-5, atol=1e-6)
