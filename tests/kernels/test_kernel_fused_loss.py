"""Kernel 3 (fused per-token loss) against a float64 branch-wise reference and against
the torch reference `archer_mcore.algo.losses.token_terms`, forward and backward."""

from __future__ import annotations

import pytest
import torch
from archer_mcore.kernels.fused_loss import (
    fused_token_terms,
    launch_token_terms_bwd,
    launch_token_terms_fwd,
)
from kernel_reference64 import rel_err, token_terms64

from archer_mcore.algo.losses import token_terms

FLAGS = ("clipped_low", "clipped_high", "clipped_dual")


def _inputs(n: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    logp = -torch.rand(n, generator=g, dtype=torch.float64) * 3
    old = logp + torch.randn(n, generator=g, dtype=torch.float64) * 0.6
    if n >= 5:  # ratio clamps at both ends, and r = 1 exactly
        old[:3] = logp[:3] + torch.tensor([30.0, -30.0, 0.0], dtype=torch.float64)
    adv = torch.randn(n, generator=g, dtype=torch.float64)
    adv[3::7] = 0.0
    ref = logp + torch.randn(n, generator=g, dtype=torch.float64) * 2
    if n >= 5:
        ref[4] = logp[4] + 25.0  # k3's x clamps at 20; exp(20) - 21 clamps at 10
    eps_low = torch.where(torch.rand(n, generator=g) < 0.5, 0.2, 0.5).double()
    eps_high = torch.where(eps_low == 0.2, 0.28, 0.5).double()
    up = torch.randn(3, n, generator=g, dtype=torch.float64)
    return logp, old, adv, ref, eps_low, eps_high, up


def _grad(terms, logp, up):
    loss = (terms["pg_loss"] * up[0] + terms["kl"] * up[1] + terms["ratio"] * up[2]).sum()
    return torch.autograd.grad(loss, logp)[0]


@pytest.mark.parametrize("n", [1, 7, 300])
@pytest.mark.parametrize("estimator", ["k1", "k2", "k3"])
@pytest.mark.parametrize("clip_c", [3.0, None])
@pytest.mark.parametrize("per_token_eps", [True, False])
@pytest.mark.parametrize("with_ref", [True, False])
def test_matches_float64_reference(n, estimator, clip_c, per_token_eps, with_ref):
    logp, old, adv, ref, eps_low, eps_high, up = _inputs(n, seed=n)
    lo, hi = (eps_low, eps_high) if per_token_eps else (0.2, 0.28)
    ref_in = ref if with_ref else None
    lp32 = logp.float().requires_grad_()
    got = fused_token_terms(
        lp32, old.float(), adv.float(), lo if not per_token_eps else lo.float(),
        hi if not per_token_eps else hi.float(), clip_c,
        ref_in.float() if with_ref else None, estimator,
    )  # fmt: skip
    got = vars(got)
    # Reference on the fp32-rounded inputs, in float64.
    lp64 = logp.float().double().requires_grad_()
    want = token_terms64(
        lp64, old.float(), adv.float(), lo, hi, clip_c,
        ref_in.float() if with_ref else None, estimator,
    )  # fmt: skip
    for key in ("pg_loss", "kl", "ratio"):
        assert got[key].dtype == torch.float32
        assert rel_err(got[key], want[key]) < 1e-5, key
    for key in FLAGS:
        assert torch.equal(got[key], want[key]), key
    assert rel_err(_grad(got, lp32, up.float()), _grad(want, lp64, up.float().double())) < 1e-5


@pytest.mark.parametrize("estimator", ["k1", "k2", "k3"])
@pytest.mark.parametrize("clip_c", [10.0, None])
def test_matches_torch_token_terms(estimator, clip_c):
    logp, old, adv, ref, eps_low, eps_high, up = _inputs(257, seed=4)
    args = (old.float(), adv.float())
    kwargs = {
        "eps_low": eps_low.float(),
        "eps_high": eps_high.float(),
        "clip_c": clip_c,
        "ref_logp": ref.float(),
        "kl_estimator": estimator,
    }
    lp_a = logp.float().requires_grad_()
    lp_b = logp.float().requires_grad_()
    got = vars(fused_token_terms(lp_a, *args, **kwargs))
    want = vars(token_terms(lp_b, *args, **kwargs))
    for key in ("pg_loss", "kl", "ratio"):
        assert torch.allclose(got[key], want[key], rtol=1e-6, atol=1e-6), key
    for key in FLAGS:
        assert torch.equal(got[key], want[key]), key
    assert torch.allclose(
        _grad(got, lp_a, up.float()), _grad(want, lp_b, up.float()), rtol=1e-5, atol=1e-6
    )
    # Dual clip and both clip sides actually occur in this data.
    assert got["clipped_low"].any() and got["clipped_high"].any()
    assert clip_c is None or got["clipped_dual"].any()


def test_leading_dims_and_bf16_logp():
    logp, old, adv, ref, _, _, _ = _inputs(24, seed=8)
    lp = logp.to(torch.bfloat16).reshape(4, 6).requires_grad_()
    got = fused_token_terms(
        lp, old.reshape(4, 6), adv.reshape(4, 6), 0.2, 0.28, 3.0, ref.reshape(4, 6)
    )
    want = token_terms64(
        lp.detach().double(),
        old.reshape(4, 6),
        adv.reshape(4, 6),
        0.2,
        0.28,
        3.0,
        ref.reshape(4, 6),
        "k3",
    )
    assert got.pg_loss.shape == (4, 6) and got.pg_loss.dtype == torch.bfloat16
    assert rel_err(got.pg_loss, want["pg_loss"]) < 1e-2
    got.pg_loss.sum().backward()
    assert lp.grad.dtype == torch.bfloat16 and torch.isfinite(lp.grad).all()


def test_every_output_element_is_written():
    n = 300  # > one CPU block of 256
    logp, old, adv, ref, eps_low, _, _ = _inputs(n, seed=2)
    f = [t.float().contiguous() for t in (logp, old, adv, ref, eps_low)]
    outs = (torch.full((n,), float("nan")),) * 0 + tuple(
        torch.full((n,), float("nan")) for _ in range(3)
    )
    flags = torch.full((3, n), 7, dtype=torch.int8)
    launch_token_terms_fwd(
        f[0], f[1], f[2], (f[4], 1), (torch.tensor([0.28]), 0), f[3], 3.0, "k3", (*outs, flags)
    )
    assert all(torch.isfinite(o).all() for o in outs)
    assert ((flags == 0) | (flags == 1)).all()

    grad = torch.full((n,), float("nan"))
    up = [torch.ones(n) for _ in range(3)]
    launch_token_terms_bwd(
        f[0], f[1], f[2], (f[4], 1), (torch.tensor([0.28]), 0), f[3], 3.0, "k3", up, grad
    )
    assert torch.isfinite(grad).all()


def test_unknown_estimator_is_rejected():
    with pytest.raises(ValueError, match="k4"):
        fused_token_terms(
            torch.zeros(2), torch.zeros(2), torch.zeros(2), 0.2, 0.2, None, torch.zeros(2), "k4"
        )
