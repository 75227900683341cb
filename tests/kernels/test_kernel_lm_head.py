"""Kernel 2 (fused LM head: entropy + log-prob from hidden states and weight) against
float64 logits -> log_softmax, under the Triton interpreter. CPU tiles are
BLOCK_M=16, BLOCK_V=32, BLOCK_K=16: the shapes below cover partial tiles on every axis,
several vocab splits (split quantum 256) and several backward chunks."""

from __future__ import annotations

import pytest
import torch
from archer_mcore.kernels.entropy_logprob import combine_partial_stats
from archer_mcore.kernels.fused_lm_head import (
    fused_lm_head_entropy_logprob,
    launch_lm_head_grad,
    launch_lm_head_stats,
    num_vocab_splits,
)
from kernel_reference64 import entropy_logprob64, rel_err


def _inputs(n: int, h: int, v: int, dtype: torch.dtype, seed: int):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, h, generator=g, dtype=torch.float64).to(dtype)
    weight = (torch.randn(v, h, generator=g, dtype=torch.float64) / h**0.25).to(dtype)
    tokens = torch.randint(0, v, (n,), generator=g)
    up = torch.randn(2, n, generator=g, dtype=torch.float64)
    return hidden, weight, tokens, up


def _run(fn, hidden, weight, tokens, up, temperature, **kw):
    hd = hidden.detach().clone().requires_grad_()
    wd = weight.detach().clone().requires_grad_()
    ent, lp = fn(hd, wd, tokens, temperature, **kw)
    (ent * up[0].to(ent.dtype) + lp * up[1].to(lp.dtype)).sum().backward()
    return ent, lp, hd.grad, wd.grad


def _reference(hidden, weight, tokens, temperature):
    return entropy_logprob64(hidden @ weight.T, tokens, temperature)


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 1e-2)])
@pytest.mark.parametrize(
    "n,h,v,chunk",
    [(1, 8, 1, None), (1, 16, 40, None), (17, 24, 300, 128), (5, 20, 600, 256), (33, 16, 77, None)],
)
@pytest.mark.parametrize("recompute", ["triton", "cublas"])
def test_matches_float64_reference(n, h, v, chunk, dtype, tol, recompute):
    hidden, weight, tokens, up = _inputs(n, h, v, dtype, seed=n + h + v)
    ent, lp, gh, gw = _run(
        fused_lm_head_entropy_logprob, hidden, weight, tokens, up, 0.8,
        chunk_cols=chunk, recompute=recompute,
    )  # fmt: skip
    want = _run(_reference, hidden.double(), weight.double(), tokens, up, 0.8)
    assert ent.dtype == lp.dtype == torch.float32 and gh.dtype == gw.dtype == dtype
    if v == 1:  # one class: everything is exactly zero
        for t in (ent, lp, gh, gw):
            assert t.abs().max() == 0
        return
    for got, ref in zip((ent, lp, gh, gw), want):
        assert rel_err(got, ref) < tol


def test_partial_statistics_of_splits_are_all_written():
    hidden, weight, tokens, _ = _inputs(20, 16, 700, torch.float32, seed=1)
    k, size = num_vocab_splits(20, 700, 16, hidden.device)
    assert k == 2 and size == 512  # two splits of the vocabulary on CPU
    out = torch.full((4, k, 20), float("nan"))
    launch_lm_head_stats(hidden, weight, tokens, 1.0, out=out)
    assert torch.isfinite(out).all()
    stats = combine_partial_stats(out)
    ent64, lp64 = _reference(hidden.double(), weight.double(), tokens, 1.0)
    assert rel_err(stats.entropy, ent64) < 1e-5 and rel_err(stats.logprob, lp64) < 1e-5

    # The gradient kernel fills every element of a chunk buffer.
    g = torch.full((20, 100), float("nan"))
    up = torch.ones(20)
    launch_lm_head_grad(hidden, weight[300:400], tokens, stats.packed(), up, up, g, 1.0, 300)
    assert torch.isfinite(g).all()


def test_extreme_logits_stay_finite():
    # Weights that give logits of about +-1e4, and rows of all-equal logits (zero hidden).
    hidden, weight, tokens, up = _inputs(6, 8, 90, torch.float32, seed=2)
    hidden = hidden * 1e3
    hidden[0] = 0.0
    ent, lp, gh, gw = _run(fused_lm_head_entropy_logprob, hidden, weight, tokens, up, 1.0)
    want = _run(_reference, hidden.double(), weight.double(), tokens, up, 1.0)
    for t in (ent, lp, gh, gw):
        assert torch.isfinite(t).all()
    assert ent[0].item() == pytest.approx(torch.log(torch.tensor(90.0)).item(), abs=1e-5)
    for got, ref in zip((ent, lp), want):
        assert ((got.double() - ref).abs() <= 1e-5 * (1 + ref.abs())).all()


def test_grads_only_for_inputs_that_need_them():
    hidden, weight, tokens, _ = _inputs(4, 8, 50, torch.float32, seed=3)
    h = hidden.clone().requires_grad_()
    _, lp = fused_lm_head_entropy_logprob(h, weight, tokens)
    lp.sum().backward()
    hd = hidden.double().requires_grad_()
    _reference(hd, weight.double(), tokens, 1.0)[1].sum().backward()
    assert rel_err(h.grad, hd.grad) < 1e-5


def test_bad_arguments_are_rejected():
    h, w = torch.zeros(2, 4), torch.zeros(3, 4)
    with pytest.raises(ValueError, match="weight"):
        fused_lm_head_entropy_logprob(h, torch.zeros(3, 5), torch.zeros(2, dtype=torch.long))
    with pytest.raises(ValueError, match="dtype|bfloat16"):
        fused_lm_head_entropy_logprob(h, w.bfloat16(), torch.zeros(2, dtype=torch.long))
    with pytest.raises(ValueError, match="temperature"):
        fused_lm_head_entropy_logprob(h, w, torch.zeros(2, dtype=torch.long), -1.0)
    with pytest.raises(ValueError, match="recompute"):
        fused_lm_head_entropy_logprob(h, w, torch.zeros(2, dtype=torch.long), recompute="x")


@pytest.mark.parametrize("recompute", ["triton", "cublas"])
def test_vocab_padding_rows_are_left_out(recompute):
    hidden, weight, tokens, up = _inputs(9, 16, 300, torch.float32, seed=4)
    tokens = tokens % 250
    padded = weight.clone()
    padded[250:] = hidden[0] * 50  # would dominate every softmax if counted
    ent, lp, gh, gw = _run(
        fused_lm_head_entropy_logprob, hidden, padded, tokens, up, 1.0,
        vocab_size=250, chunk_cols=128, recompute=recompute,
    )  # fmt: skip
    want = _run(_reference, hidden.double(), weight[:250].double(), tokens, up, 1.0)
    for got, ref in zip((ent, lp, gh), want):
        assert rel_err(got, ref) < 1e-5
    assert rel_err(gw[:250], want[3]) < 1e-5
    assert gw[250:].abs().max() == 0
