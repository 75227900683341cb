"""Hand-derived numeric cases for the RLVR math (the formulas of docs/design.md).

Each expected value is derived in the comment beside it.
"""

from __future__ import annotations

import math

import pytest
import torch

from archer_mcore.algo.advantages import group_keep_mask, grpo_advantages, overlong_penalty
from archer_mcore.algo.kl import kl_estimate
from archer_mcore.algo.losses import LossConfig, aggregate, policy_loss, token_terms
from archer_mcore.algo.token_groups import (
    archer_quantile,
    archer_reasoning_mask,
    forking_k,
    forking_mask,
)
from archer_mcore.config import ArcherRuleConfig, ForkingRuleConfig

PAD = 0.0


def test_archer_split_five_tokens():
    # Sorted H = [.1 .2 .3 .4 .5], q = 0.8 -> position 0.8 * (5 - 1) = 3.2, between
    # index 3 (0.4) and 4 (0.5): tau = 0.4 + 0.2 * (0.5 - 0.4) = 0.42. Only 0.5 > 0.42.
    h = torch.tensor([[0.1, 0.2, 0.3, 0.4, 0.5]])
    m = torch.ones_like(h, dtype=torch.bool)
    assert archer_quantile(h, m).item() == pytest.approx(0.42, abs=1e-6)
    assert archer_reasoning_mask(h, m).tolist() == [[False, False, False, False, True]]


def test_archer_split_with_padding():
    # Valid H = [1 2 3]: position 0.8 * 2 = 1.6 -> tau = 2 + 0.6 * (3 - 2) = 2.6; only 3 is
    # reasoning; the two padding slots are in neither group.
    h = torch.tensor([[1.0, 2.0, 3.0, PAD, PAD]])
    m = torch.tensor([[True, True, True, False, False]])
    assert archer_quantile(h, m).item() == pytest.approx(2.6, abs=1e-6)
    reasoning = archer_reasoning_mask(h, m)
    knowledge = m & ~reasoning
    assert reasoning.tolist() == [[False, False, True, False, False]]
    assert knowledge.tolist() == [[True, True, False, False, False]]


def test_archer_ties_and_single_token_go_to_knowledge():
    # One token: tau = H itself, and H > tau is false. All-equal H: tau = H, none above.
    one = archer_reasoning_mask(torch.tensor([[0.7]]), torch.tensor([[True]]))
    ties = archer_reasoning_mask(torch.full((1, 4), 0.3), torch.ones(1, 4, dtype=torch.bool))
    assert not one.any() and not ties.any()


def _tok_loss(a: float, r: float, lo: float, hi: float, c: float | None = None) -> float:
    logp = torch.tensor([math.log(r)], dtype=torch.float64)
    old = torch.zeros(1, dtype=torch.float64)
    adv = torch.tensor([a], dtype=torch.float64)
    return token_terms(logp, old, adv, eps_low=lo, eps_high=hi, clip_c=c).pg_loss.item()


def test_token_loss_knowledge_and_reasoning_clips():
    # A = +1, r = 1.4: knowledge max(-1.4, -clip(1.4, .8, 1.2)) = max(-1.4, -1.2) = -1.2;
    # reasoning (0.5/0.5): max(-1.4, -clip(1.4, .5, 1.5)) = -1.4.
    assert _tok_loss(1.0, 1.4, 0.2, 0.2) == pytest.approx(-1.2)
    assert _tok_loss(1.0, 1.4, 0.5, 0.5) == pytest.approx(-1.4)
    # A = -1, r = 0.6: knowledge max(0.6, clip(0.6, .8, 1.2) = 0.8) = 0.8;
    # reasoning max(0.6, clip(0.6, .5, 1.5) = 0.6) = 0.6.
    assert _tok_loss(-1.0, 0.6, 0.2, 0.2) == pytest.approx(0.8)
    assert _tok_loss(-1.0, 0.6, 0.5, 0.5) == pytest.approx(0.6)


def test_dual_clip():
    # A = -1, r = 12: max(12, clip(12) = 1.2) = 12, then min(12, -A c) = c.
    assert _tok_loss(-1.0, 12.0, 0.2, 0.2, c=10.0) == pytest.approx(10.0)
    assert _tok_loss(-1.0, 12.0, 0.2, 0.2, c=3.0) == pytest.approx(3.0)


def test_dapo_clip_higher():
    # A = +1, r = 1.25 < 1.28: inside the range, loss -1.25.
    # A = -1, r = 1.5: max(1.5, clip(1.5, .8, 1.28) = 1.28) = 1.5 (below c = 10).
    assert _tok_loss(1.0, 1.25, 0.2, 0.28, c=10.0) == pytest.approx(-1.25)
    assert _tok_loss(-1.0, 1.5, 0.2, 0.28, c=10.0) == pytest.approx(1.5)


def test_grpo_advantages():
    # R = [1 0 0 0]: mean 0.25; unbiased var = (0.75^2 + 3 * 0.25^2) / 3 = 0.25, std 0.5.
    # A = 0.75 / (0.5 + 1e-6) = 1.499997, -0.25 / 0.500001 = -0.499999.
    a = grpo_advantages(torch.tensor([[1.0, 0.0, 0.0, 0.0]]))
    assert a[0, 0].item() == pytest.approx(1.499997, abs=1e-6)
    assert a[0, 1:].tolist() == pytest.approx([-0.499999] * 3, abs=1e-6)
    # Without std: R - mean = [0.75, -0.25 x3].
    b = grpo_advantages(torch.tensor([[1.0, 0.0, 0.0, 0.0]]), norm_by_std=False)
    assert b[0].tolist() == pytest.approx([0.75, -0.25, -0.25, -0.25])
    assert grpo_advantages(torch.full((2, 4), 0.7)).abs().max().item() == 0.0
    assert grpo_advantages(torch.tensor([[5.0]])).item() == 0.0  # a group of one


def test_overlong_penalty():
    # Lmax - Lcache = 16384: 16384 -> 0; 16385 -> -1/4096 = -0.000244140625;
    # 18432 -> -2048/4096 = -0.5; 20480 -> -1; beyond stays -1.
    out = overlong_penalty(torch.tensor([16384, 16385, 18432, 20480, 30000]), 20480, 4096)
    assert out.tolist() == [0.0, -0.000244140625, -0.5, -1.0, -1.0]


def test_kl_estimators():
    # logp = -1, ref = -1.5: d = 0.5 -> k1 0.5, k2 0.125; x = ref - logp = -0.5,
    # k3 = e^-0.5 + 0.5 - 1 = 0.1065307. Swapped: x = 0.5, k3 = e^0.5 - 1.5 = 0.1487213.
    lp, ref = torch.tensor([-1.0]), torch.tensor([-1.5])
    assert kl_estimate(lp, ref, "k1").item() == pytest.approx(0.5)
    assert kl_estimate(lp, ref, "k2").item() == pytest.approx(0.125)
    assert kl_estimate(lp, ref, "k3").item() == pytest.approx(0.1065307, abs=1e-7)
    assert kl_estimate(ref, lp, "k3").item() == pytest.approx(0.1487213, abs=1e-7)
    with pytest.raises(ValueError, match="k4"):
        kl_estimate(lp, ref, "k4")


def test_aggregation_modes():
    # Responses [1 1 1] and [4]: token-mean 7 / 4 = 1.75; seq-mean-token-mean
    # (1 + 4) / 2 = 2.5; seq-mean-token-sum (3 + 4) / 2 = 3.5.
    v = torch.tensor([[1.0, 1.0, 1.0], [4.0, 99.0, 99.0]])
    m = torch.tensor([[True, True, True], [True, False, False]])
    assert aggregate(v, m, "token-mean").item() == pytest.approx(1.75)
    assert aggregate(v, m, "seq-mean-token-mean").item() == pytest.approx(2.5)
    assert aggregate(v, m, "seq-mean-token-sum").item() == pytest.approx(3.5)


@pytest.mark.parametrize(("n", "k"), [(1, 1), (4, 1), (5, 1), (7, 2), (10, 2), (16, 4), (33, 7)])
def test_forking_k(n, k):
    # k = max(1, ceil(0.2 N)): 0.2, 0.8, 1.0, 1.4, 2.0, 3.2, 6.6 -> 1 1 1 2 2 4 7.
    assert forking_k(n, 0.2) == k


def test_forking_k_float_edge():
    # 0.2 * 15 is 3.0000000000000004 in floating point; the count must still be 3.
    assert forking_k(15, 0.2) == 3 and forking_k(0, 0.2) == 0


def test_forking_selection_example():
    # 7 valid tokens -> k = 2: the two largest are 0.9 and 0.7; padding is never chosen.
    e = torch.tensor([[0.1, 0.9, 0.2, PAD], [0.5, 0.05, 0.3, 0.7]])
    m = torch.tensor([[True, True, True, False], [True, True, True, True]])
    sel = forking_mask(e, m, 0.2)
    assert sel.tolist() == [[False, True, False, False], [False, False, False, True]]


def test_group_filter():
    # Groups: all correct (std 0), mixed, all wrong (std 0): keep only the middle one.
    s = torch.tensor([[1.0, 1.0, 1.0], [1.0, 0.0, 0.0], [0.0, 0.0, 0.0]])
    assert group_keep_mask(s).tolist() == [False, True, False]


def test_archer_policy_loss_by_hand():
    # One response, H = [0.1 .2 .3 .4 .5]: token 5 is reasoning (tau 0.42). A = +1 and every
    # ratio 1.4: knowledge tokens clip to -1.2, the reasoning token (0.5/0.5) keeps -1.4.
    # seq-mean-token-mean: (4 * -1.2 - 1.4) / 5 = -1.24.
    # KL: logp = log 1.4, ref = logp - 0.5 -> k1 = 0.5 per token; knowledge mean 0.5 * 0.001.
    cfg = LossConfig(
        token_rule=ArcherRuleConfig(
            reasoning_clip_low=0.5, reasoning_clip_high=0.5, reasoning_kl_coef=0.0
        ),
        clip_low=0.2,
        clip_high=0.2,
        clip_ratio_c=10.0,
        kl_coef=0.001,
        kl_estimator="k1",
        agg_mode="seq-mean-token-mean",
    )
    logp = torch.full((1, 5), math.log(1.4), dtype=torch.float64)
    h = torch.tensor([[0.1, 0.2, 0.3, 0.4, 0.5]], dtype=torch.float64)
    m = torch.ones(1, 5, dtype=torch.bool)
    loss, met = policy_loss(
        logp,
        torch.zeros_like(logp),
        torch.ones(1, dtype=torch.float64),
        m,
        h,
        ref_logp=logp - 0.5,
        cfg=cfg,
    )
    assert met["loss/pg"].item() == pytest.approx(-1.24)
    assert met["loss/kl"].item() == pytest.approx(0.0005)
    assert loss.item() == pytest.approx(-1.24 + 0.0005)
    assert met["clip/high/knowledge"].item() == 1.0 and met["clip/high/reasoning"].item() == 0.0
    assert met["share/reasoning"].item() == pytest.approx(0.2)
    assert met["entropy/reasoning"].item() == pytest.approx(0.5)
    assert met["entropy/knowledge"].item() == pytest.approx(0.25)


def test_forking_normalizers_by_hand():
    # Token losses with A = +1, r = 1 are -1 each. 7 valid tokens, k = 2 selected.
    # normaliser "selected": -2 / 2 = -1; "all": -2 / 7.
    e = torch.tensor([[0.1, 0.9, 0.2, PAD], [0.5, 0.05, 0.3, 0.7]])
    m = torch.tensor([[True, True, True, False], [True, True, True, True]])
    z = torch.zeros(2, 4)
    for norm, want in (("selected", -1.0), ("all", -2.0 / 7.0)):
        cfg = LossConfig(token_rule=ForkingRuleConfig(rho=0.2, normalizer=norm))
        loss, met = policy_loss(z, z, torch.ones(2), m, e, ref_logp=None, cfg=cfg)
        assert loss.item() == pytest.approx(want)
        assert met["tokens/forking"].item() == 2.0


def test_normalizer_rescales_to_minibatch_mean():
    # Two micro-batches of a mini-batch: token losses -1 (2 tokens) and -3 (1 token) at
    # r = 1 with A = 1 and A = 3. Mini-batch token-mean = (-1 - 1 - 3) / 3 = -5/3; with
    # normalizer = 3 the micro-batch losses (-1 * 2/3 and -3 * 1/3) sum to it.
    cfg = LossConfig()
    z1, z2 = torch.zeros(1, 2), torch.zeros(1, 1)
    l1, _ = policy_loss(
        z1, z1, torch.tensor([1.0]), z1 == 0, z1, ref_logp=None, cfg=cfg, normalizer=3
    )
    l2, _ = policy_loss(
        z2, z2, torch.tensor([3.0]), z2 == 0, z2, ref_logp=None, cfg=cfg, normalizer=3
    )
    assert (l1 + l2).item() == pytest.approx(-5.0 / 3.0)


def test_token_weights_scale_the_policy_gradient_only():
    # r = 1, A = +1: token losses -1. Weights [0.5, 2] with token-mean: (-0.5 - 2) / 2
    # = -1.25; the KL term (k1 = 0.5 per token, coefficient 0.1) is not reweighted: +0.05.
    z = torch.zeros(1, 2, dtype=torch.float64)
    cfg = LossConfig(kl_coef=0.1, kl_estimator="k1")
    w = torch.tensor([[0.5, 2.0]], dtype=torch.float64)
    loss, met = policy_loss(
        z, z, torch.ones(1), z == 0, z, ref_logp=z - 0.5, cfg=cfg, token_weights=w
    )
    assert met["loss/pg"].item() == pytest.approx(-1.25)
    assert loss.item() == pytest.approx(-1.25 + 0.05)
