"""Kernel 1 (entropy + log-prob from logits) against a float64 reference, under the
Triton interpreter. CPU tile size is 64 columns, so V = 63 / 64 / 65 / 130 cover partial,
exact and multi-block rows."""

from __future__ import annotations

import pytest
import torch
from archer_mcore.kernels.entropy_logprob import (
    combine_partial_stats,
    entropy_and_logprob,
    launch_grad,
    launch_stats,
    vocab_parallel_entropy_and_logprob,
)
from kernel_reference64 import entropy_logprob64, rel_err

SHAPES = [(1, 1), (3, 1), (1, 64), (5, 63), (4, 65), (3, 130), (2, 200)]


def _inputs(n: int, v: int, dtype: torch.dtype, seed: int, scale: float = 3.0):
    g = torch.Generator().manual_seed(seed)
    logits = (torch.randn(n, v, generator=g, dtype=torch.float64) * scale).to(dtype)
    tokens = torch.randint(0, v, (n,), generator=g)
    weights = torch.randn(2, n, generator=g, dtype=torch.float64)
    return logits, tokens, weights


def _fwd_bwd(fn, logits, tokens, weights, temperature):
    z = logits.detach().clone().requires_grad_()
    h, lp = fn(z, tokens, temperature)
    (h * weights[0].to(h.dtype) + lp * weights[1].to(lp.dtype)).sum().backward()
    return h, lp, z.grad


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 1e-2)])
@pytest.mark.parametrize("n,v", SHAPES)
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_matches_float64_reference(n, v, dtype, tol, temperature):
    logits, tokens, weights = _inputs(n, v, dtype, seed=n * 1000 + v)
    h, lp, grad = _fwd_bwd(entropy_and_logprob, logits, tokens, weights, temperature)
    # Reference on the same (already rounded) inputs, exact float64 math.
    h64, lp64, grad64 = _fwd_bwd(entropy_logprob64, logits.double(), tokens, weights, temperature)
    assert h.dtype == lp.dtype == torch.float32 and grad.dtype == dtype
    if v == 1:  # one class: H = 0, log p = 0, zero gradient, exactly
        assert h.abs().max() == 0 and lp.abs().max() == 0 and grad.abs().max() == 0
        return
    assert rel_err(h, h64) < tol
    assert rel_err(lp, lp64) < tol
    assert rel_err(grad, grad64) < tol


def test_one_sided_gradients():
    # Only entropy (logprob unused) and only logprob: the missing upstream grad is zero.
    logits, tokens, _ = _inputs(4, 70, torch.float32, seed=3)
    for pick in (0, 1):
        z = logits.clone().requires_grad_()
        z64 = logits.double().requires_grad_()
        entropy_and_logprob(z, tokens, 0.9)[pick].sum().backward()
        entropy_logprob64(z64, tokens, 0.9)[pick].sum().backward()
        assert rel_err(z.grad, z64.grad) < 1e-5


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 1e-2)])
def test_extreme_logits_stay_finite(dtype, tol):
    v = 97
    rows = torch.zeros(6, v, dtype=torch.float64)
    rows[0] = 1e4  # all equal (large): uniform, H = log V
    rows[1] = -1e4  # all equal (very negative)
    rows[2, ::2] = 1e4
    rows[2, 1::2] = -1e4  # two levels 2e4 apart: uniform over the 49 high ones
    rows[3] = -1e4
    rows[3, 5] = 1e4  # one-hot: H = 0, log p(5) = 0
    rows[4] = torch.linspace(-1e4, 1e4, v, dtype=torch.float64)
    rows[5] = 0.0  # all equal zero
    logits = rows.to(dtype)
    tokens = torch.tensor([0, 3, 1, 5, 96, 50])
    weights = torch.ones(2, 6, dtype=torch.float64)
    h, lp, grad = _fwd_bwd(entropy_and_logprob, logits, tokens, weights, 1.0)
    h64, lp64, grad64 = _fwd_bwd(entropy_logprob64, logits.double(), tokens, weights, 1.0)
    for t in (h, lp, grad):
        assert torch.isfinite(t).all()
    # Elementwise: |err| < tol (1 + |ref|); log p of a low token is about -2e4 here.
    # (bf16: the gradient is stored in bf16, the statistics are fp32.)
    for got, ref in ((h, h64), (lp, lp64), (grad, grad64)):
        assert ((got.double() - ref).abs() <= tol * (1 + ref.abs())).all()
    assert h[0].item() == pytest.approx(torch.log(torch.tensor(97.0)).item(), abs=1e-5)
    assert h[3].item() == 0.0 and lp[3].item() == 0.0


def test_every_output_element_is_written():
    logits, tokens, weights = _inputs(5, 130, torch.float32, seed=9)
    stats = torch.full((4, 5), float("nan"))
    launch_stats(logits, tokens, stats, 1.3)
    assert torch.isfinite(stats).all()
    grad = torch.full_like(logits, float("nan"))
    row = combine_partial_stats(stats.unsqueeze(1)).packed()
    launch_grad(logits, grad, tokens, row, weights[0].float(), weights[1].float(), 1.3)
    assert torch.isfinite(grad).all()
    _, _, grad64 = _fwd_bwd(entropy_logprob64, logits.double(), tokens, weights, 1.3)
    assert rel_err(grad, grad64) < 1e-5


def test_vocab_shards_combine_to_the_whole_row():
    # Partial statistics of three uneven vocab slices, combined, equal the whole row's.
    logits, tokens, _ = _inputs(6, 150, torch.float32, seed=21)
    bounds = [(0, 40), (40, 41), (41, 150)]
    parts = [
        launch_stats(logits[:, lo:hi].contiguous(), tokens, torch.empty(4, 6), 0.8, vocab_start=lo)
        for lo, hi in bounds
    ]
    combined = combine_partial_stats(torch.stack(parts, dim=1))
    h64, lp64 = entropy_logprob64(logits.double(), tokens, 0.8)
    assert rel_err(combined.entropy, h64) < 1e-5
    assert rel_err(combined.logprob, lp64) < 1e-5


def test_leading_dims_and_strided_rows():
    logits, tokens, _ = _inputs(6, 70, torch.float32, seed=5)
    wide = torch.zeros(6, 90)
    wide[:, :70] = logits
    h, lp = entropy_and_logprob(wide[:, :70].reshape(2, 3, 70), tokens.reshape(2, 3), 1.0)
    h64, lp64 = entropy_logprob64(logits.double(), tokens, 1.0)
    assert h.shape == (2, 3)
    assert rel_err(h.reshape(-1), h64) < 1e-5 and rel_err(lp.reshape(-1), lp64) < 1e-5


def test_bad_arguments_are_rejected():
    with pytest.raises(ValueError, match="temperature"):
        entropy_and_logprob(torch.zeros(2, 3), torch.zeros(2, dtype=torch.long), 0.0)
    with pytest.raises(ValueError, match="differ"):
        entropy_and_logprob(torch.zeros(2, 3), torch.zeros(3, dtype=torch.long))


def test_vocab_padding_is_left_out():
    # Megatron pads the vocabulary: ids >= vocab_size must not enter the softmax, and
    # their gradient is zero. Padding columns hold huge logits that would dominate.
    logits, tokens, weights = _inputs(4, 100, torch.float32, seed=13)
    tokens = tokens % 90
    padded = logits.clone()
    padded[:, 90:] = 1e4
    h, lp, grad = _fwd_bwd(
        lambda z, y, t: vocab_parallel_entropy_and_logprob(z, y, t, vocab_size=90),
        padded, tokens, weights, 0.8,
    )  # fmt: skip
    h64, lp64, grad64 = _fwd_bwd(entropy_logprob64, logits[:, :90].double(), tokens, weights, 0.8)
    assert rel_err(h, h64) < 1e-5 and rel_err(lp, lp64) < 1e-5
    assert rel_err(grad[:, :90], grad64) < 1e-5
    assert grad[:, 90:].abs().max() == 0


def test_a_shard_of_only_padding_combines_to_nothing():
    logits, tokens, _ = _inputs(3, 70, torch.float32, seed=17)
    real = launch_stats(logits, tokens, torch.empty(4, 3), 1.0, vocab_start=0, vocab_size=70)
    pad = launch_stats(logits, tokens, torch.empty(4, 3), 1.0, vocab_start=70, vocab_size=70)
    assert torch.isinf(pad[0]).all() and (pad[1:] == 0).all()
    combined = combine_partial_stats(torch.stack([real, pad], dim=1))
    h64, lp64 = entropy_logprob64(logits.double(), tokens, 1.0)
    assert rel_err(combined.entropy, h64) < 1e-5 and rel_err(combined.logprob, lp64) < 1e-5


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 1e-2)])
def test_inplace_backward_writes_the_gradient_over_the_logits(dtype, tol):
    logits, tokens, weights = _inputs(5, 130, dtype, seed=31)
    leaf = logits.clone().requires_grad_()
    z = leaf * 1  # a non-leaf logits tensor, like the output layer's
    h, lp = entropy_and_logprob(z, tokens, 0.9, inplace_backward=True)
    (h * weights[0].float() + lp * weights[1].float()).sum().backward()
    _, _, grad64 = _fwd_bwd(entropy_logprob64, logits.double(), tokens, weights, 0.9)
    assert rel_err(leaf.grad, grad64) < tol
    assert torch.equal(z.detach(), leaf.grad)  # z's memory now holds its gradient
