"""Property tests (hypothesis) for token groups and padding invariance."""

from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from archer_mcore.algo.losses import LossConfig, policy_loss
from archer_mcore.algo.token_groups import archer_reasoning_mask, forking_k, forking_mask
from archer_mcore.config import BUILTIN_TOKEN_RULES, ArcherRuleConfig

entropies = st.lists(st.floats(0.0, 5.0, allow_nan=False, width=32), min_size=1, max_size=12)


def _pad(rows: list[list[float]], extra: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(r) for r in rows) + extra
    e = torch.full((len(rows), width), 123.0)  # padding holds a huge entropy on purpose
    m = torch.zeros(len(rows), width, dtype=torch.bool)
    for i, r in enumerate(rows):
        e[i, : len(r)] = torch.tensor(r)
        m[i, : len(r)] = True
    return e, m


def _quantile_by_hand(values: list[float], q: float) -> float:
    """Linear-interpolation quantile, written out independently of torch."""
    s = sorted(values)
    pos = q * (len(s) - 1)
    lo = int(pos)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (pos - lo) * (s[hi] - s[lo])


@settings(max_examples=150, deadline=None)
@given(st.lists(entropies, min_size=1, max_size=5), st.floats(0.05, 0.95))
def test_reasoning_tokens_are_those_strictly_above_quantile(rows, q):
    e, m = _pad(rows, extra=2)
    got = archer_reasoning_mask(e, m, q)
    for i, r in enumerate(rows):
        tau = _quantile_by_hand(r, q)
        for j, h in enumerate(r):
            # Allow float32 rounding only when h is within 1e-5 of tau.
            if abs(h - tau) > 1e-5:
                assert bool(got[i, j]) == (h > tau)
        assert not got[i, len(r) :].any()


@settings(max_examples=150, deadline=None)
@given(st.lists(entropies, min_size=1, max_size=5), st.floats(0.01, 1.0))
def test_forking_selects_exactly_k_valid_tokens_of_top_entropy(rows, rho):
    e, m = _pad(rows, extra=1)
    sel = forking_mask(e, m, rho)
    n = int(m.sum())
    k = forking_k(n, rho)
    assert int(sel.sum()) == k
    assert not (sel & ~m).any()
    chosen, rest = e[sel], e[m & ~sel]
    if rest.numel():
        assert chosen.min() >= rest.max()


@settings(max_examples=60, deadline=None)
@given(
    st.lists(entropies, min_size=1, max_size=4),
    st.integers(1, 3),
    st.sampled_from(["none", "archer", "forking"]),
    st.sampled_from(["token-mean", "seq-mean-token-mean", "seq-mean-token-sum"]),
    st.integers(0, 2**16),
)
def test_padding_never_changes_the_loss(rows, extra, rule, agg, seed):
    g = torch.Generator().manual_seed(seed)
    e1, m1 = _pad(rows)
    _, m2 = _pad(rows, extra=extra)
    b, w1 = m1.shape
    w2 = m2.shape[1]

    def widen(x: torch.Tensor, fill: float) -> torch.Tensor:
        out = torch.full((b, w2), fill, dtype=x.dtype)
        out[:, :w1] = x
        return out.masked_fill(~m2 & (torch.arange(w2) < w1), fill)

    old = -torch.rand(b, w1, generator=g, dtype=torch.float64) * 2
    logp = old + torch.randn(b, w1, generator=g, dtype=torch.float64) * 0.3
    ref = old + torch.randn(b, w1, generator=g, dtype=torch.float64) * 0.2
    adv = torch.randn(b, generator=g, dtype=torch.float64)
    settings = BUILTIN_TOKEN_RULES[rule]()
    if rule == "archer":
        settings = ArcherRuleConfig(reasoning_kl_coef=0.02)
    cfg = LossConfig(token_rule=settings, agg_mode=agg, kl_coef=0.05)
    a, ma = policy_loss(logp, old, adv, m1, e1.double(), ref_logp=ref, cfg=cfg)
    # Padding slots get garbage values (large log-probs, huge entropies): must not matter.
    b_loss, mb = policy_loss(
        widen(logp, 7.0),
        widen(old, -9.0),
        adv,
        m2,
        widen(e1.double(), 55.0),
        ref_logp=widen(ref, 3.0),
        cfg=cfg,
    )
    torch.testing.assert_close(a, b_loss, rtol=0, atol=1e-10)
    for key in ma:
        torch.testing.assert_close(ma[key].double(), mb[key].double(), rtol=0, atol=1e-6)
