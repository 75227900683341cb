"""The algo/ functions against independent float64 implementations and equivalences."""

from __future__ import annotations

import math

import pytest
import torch

from archer_mcore.algo.advantages import grpo_advantages
from archer_mcore.algo.entropy import entropy_and_logprob
from archer_mcore.algo.losses import LossConfig, policy_loss
from archer_mcore.config import ArcherRuleConfig, ForkingRuleConfig


def _entropy_logprob_f64(logits: torch.Tensor, tokens: torch.Tensor, t: float):
    """Plain float64 definition: p = softmax(z/T), H = -sum p log p, log p[y]."""
    logp_all = torch.log_softmax(logits.double() / t, dim=-1)
    h = -(logp_all.exp() * logp_all).sum(-1)
    return h, logp_all.gather(-1, tokens.unsqueeze(-1)).squeeze(-1)


@pytest.mark.parametrize("vocab", [1, 7, 64, 1000, 4099])
@pytest.mark.parametrize("temperature", [1.0, 0.6])
def test_entropy_logprob_matches_float64(vocab, temperature):
    g = torch.Generator().manual_seed(vocab)
    logits = torch.randn(37, vocab, generator=g) * 4
    tokens = torch.randint(0, vocab, (37,), generator=g)
    h, lp = entropy_and_logprob(logits, tokens, temperature, chunk_rows=8)
    h64, lp64 = _entropy_logprob_f64(logits, tokens, temperature)
    assert h.dtype == torch.float32 and lp.dtype == torch.float32
    torch.testing.assert_close(h.double(), h64, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(lp.double(), lp64, rtol=1e-5, atol=1e-5)


def test_entropy_logprob_grad_matches_float64_autograd():
    g = torch.Generator().manual_seed(0)
    logits = (torch.randn(2, 9, 50, generator=g) * 3).requires_grad_()
    tokens = torch.randint(0, 50, (2, 9), generator=g)
    w_h, w_l = torch.randn(2, 9, generator=g), torch.randn(2, 9, generator=g)
    h, lp = entropy_and_logprob(logits, tokens, 0.8, chunk_rows=5)
    (h * w_h + lp * w_l).sum().backward()
    ref = logits.detach().double().requires_grad_()
    h64, lp64 = _entropy_logprob_f64(ref.reshape(-1, 50), tokens.reshape(-1), 0.8)
    (h64 * w_h.reshape(-1).double() + lp64 * w_l.reshape(-1).double()).sum().backward()
    torch.testing.assert_close(logits.grad.double(), ref.grad, rtol=1e-5, atol=1e-6)


def test_entropy_logprob_gradcheck_float64():
    g = torch.Generator().manual_seed(1)
    z = torch.randn(6, 11, generator=g, dtype=torch.float64, requires_grad=True)
    y = torch.randint(0, 11, (6,), generator=g)
    assert torch.autograd.gradcheck(lambda x: entropy_and_logprob(x, y, 0.7, 4), (z,))


def test_entropy_extreme_logits_finite_and_bf16():
    z = torch.tensor([[1e4, -1e4, 0.0], [5.0, 5.0, 5.0]])
    h, lp = entropy_and_logprob(z, torch.tensor([1, 2]))
    assert torch.isfinite(h).all() and torch.isfinite(lp).all()
    assert h[1].item() == pytest.approx(math.log(3), abs=1e-6)
    zb = torch.randn(16, 300).bfloat16()
    hb, _ = entropy_and_logprob(zb, torch.zeros(16, dtype=torch.long))
    h64, _ = _entropy_logprob_f64(zb.double(), torch.zeros(16, dtype=torch.long), 1.0)
    torch.testing.assert_close(hb.double(), h64, rtol=1e-5, atol=1e-5)


def _rand_batch(seed: int, b: int = 4, seq: int = 9, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, seq + 1, (b,), generator=g)
    mask = torch.arange(seq).unsqueeze(0) < lengths.unsqueeze(1)
    old = -torch.rand(b, seq, generator=g, dtype=dtype) * 3
    logp = old + torch.randn(b, seq, generator=g, dtype=dtype) * 0.4
    ref = old + torch.randn(b, seq, generator=g, dtype=dtype) * 0.3
    ent = torch.rand(b, seq, generator=g, dtype=dtype) * 2
    adv = torch.randn(b, generator=g, dtype=dtype)
    return logp, old, adv, mask, ent, ref


ALL_RULES = [
    LossConfig(agg_mode="token-mean", kl_coef=0.1, kl_estimator="k3", entropy_coef=0.01),
    LossConfig(
        token_rule=ArcherRuleConfig(
            reasoning_clip_low=0.5, reasoning_clip_high=0.5, reasoning_kl_coef=0.1
        ),
        kl_coef=0.3,
        agg_mode="seq-mean-token-mean",
        clip_ratio_c=10.0,
    ),
    LossConfig(token_rule=ForkingRuleConfig(normalizer="all"), agg_mode="seq-mean-token-sum"),
]


@pytest.mark.parametrize("cfg", ALL_RULES, ids=["none", "archer", "forking"])
def test_policy_loss_gradcheck(cfg):
    logp, old, adv, mask, ent, ref = _rand_batch(3)
    logp.requires_grad_()
    ent.requires_grad_(cfg.entropy_coef != 0)
    inputs = (logp, ent) if ent.requires_grad else (logp,)

    def f(*xs):
        e = xs[1] if len(xs) > 1 else ent
        return policy_loss(xs[0], old, adv, mask, e, ref_logp=ref, cfg=cfg)[0]

    assert torch.autograd.gradcheck(f, inputs)


@pytest.mark.parametrize("agg", ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum"])
def test_archer_with_equal_clips_and_no_kl_equals_plain_loss(agg):
    logp, old, adv, mask, ent, ref = _rand_batch(5)
    plain = LossConfig(clip_low=0.2, clip_high=0.28, agg_mode=agg, clip_ratio_c=10.0)
    archer = LossConfig(
        token_rule=ArcherRuleConfig(reasoning_clip_low=0.2, reasoning_clip_high=0.28),
        clip_low=0.2,
        clip_high=0.28,
        agg_mode=agg,
        clip_ratio_c=10.0,
    )
    a, _ = policy_loss(logp, old, adv, mask, ent, ref_logp=ref, cfg=plain)
    b, _ = policy_loss(logp, old, adv, mask, ent, ref_logp=ref, cfg=archer)
    torch.testing.assert_close(a, b, rtol=0, atol=1e-12)


@pytest.mark.parametrize("agg", ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum"])
def test_forking_with_rho_one_equals_unmasked(agg):
    logp, old, adv, mask, ent, ref = _rand_batch(7)
    plain = LossConfig(agg_mode=agg)
    fork = LossConfig(token_rule=ForkingRuleConfig(rho=1.0), agg_mode=agg)
    a, _ = policy_loss(logp, old, adv, mask, ent, ref_logp=ref, cfg=plain)
    b, met = policy_loss(logp, old, adv, mask, ent, ref_logp=ref, cfg=fork)
    torch.testing.assert_close(a, b, rtol=0, atol=1e-12)
    assert met["tokens/forking"].item() == mask.sum().item()


def test_grpo_invariant_to_constant_shift():
    g = torch.Generator().manual_seed(2)
    r = torch.randint(0, 2, (5, 8), generator=g).float()
    shift = torch.randn(5, 1, generator=g) * 10
    for norm in (True, False):
        torch.testing.assert_close(
            grpo_advantages(r, norm), grpo_advantages(r + shift, norm), rtol=0, atol=1e-5
        )
