"""Truncated importance sampling and the trainer/rollout mismatch metrics, by hand."""

from __future__ import annotations

import math

import pytest
import torch

from archer_mcore.algo.rollout_correction import (
    apply_truncated_is,
    mismatch_metrics,
    truncated_is_weights,
)

LN = math.log


def test_weights_by_hand():
    # train/rollout probabilities 0.5/0.25, 0.2/0.4, 0.9/0.1 -> ratios 2, 0.5, 9; cap 2
    old = torch.tensor([LN(0.5), LN(0.2), LN(0.9)])
    roll = torch.tensor([LN(0.25), LN(0.4), LN(0.1)])
    w = truncated_is_weights(old, roll, cap=2.0)
    torch.testing.assert_close(w, torch.tensor([2.0, 0.5, 2.0]))
    masked = truncated_is_weights(old, roll, cap=2.0, mask=torch.tensor([1, 0, 1]))
    torch.testing.assert_close(masked, torch.tensor([2.0, 0.0, 2.0]))


def test_weights_are_detached_and_never_overflow():
    old = torch.tensor([0.0, -1.0], requires_grad=True)
    roll = torch.tensor([-1000.0, -1.0])
    w = truncated_is_weights(old, roll, cap=5.0)
    assert not w.requires_grad
    torch.testing.assert_close(w, torch.tensor([5.0, 1.0]))
    with pytest.raises(ValueError, match="tis_cap"):
        truncated_is_weights(old, roll, cap=0.0)


def test_apply_reweights_each_token():
    loss = torch.tensor([[1.0, -2.0], [3.0, 0.5]], requires_grad=True)
    w = torch.tensor([[2.0, 0.5], [0.0, 1.0]])
    out = apply_truncated_is(loss, w)
    torch.testing.assert_close(out, torch.tensor([[2.0, -1.0], [0.0, 0.5]]))
    out.sum().backward()
    torch.testing.assert_close(loss.grad, w)  # the weights scale the gradient, nothing else


def test_metrics_by_hand():
    old = torch.tensor([[LN(0.5), LN(0.2), 0.0]])
    roll = torch.tensor([[LN(0.25), LN(0.4), -7.0]])
    mask = torch.tensor([[1, 1, 0]])
    m = mismatch_metrics(old, roll, mask, cap=1.5)
    # x = ln 2, ln 0.5: k3 = (2 - ln2 - 1) + (0.5 + ln2 - 1) over 2 = 0.25; k1 = -(ln2 - ln2)/2 = 0
    assert m["mismatch_kl_k3"] == pytest.approx(0.25, abs=1e-7)
    assert m["mismatch_kl_k1"] == pytest.approx(0.0, abs=1e-7)
    assert m["mismatch_abs_logp_diff_max"] == pytest.approx(LN(2), abs=1e-7)
    # weights min(2, 1.5) = 1.5 and 0.5: mean 1.0; one of two tokens clipped
    assert m["tis_weight_mean"] == pytest.approx(1.0, abs=1e-7)
    assert m["tis_clipped_fraction"] == 0.5
    assert m["mismatch_tokens"] == 2.0


def test_empty_mask_gives_zeros():
    m = mismatch_metrics(torch.zeros(2, 3), torch.ones(2, 3), torch.zeros(2, 3), cap=2.0)
    assert m == {
        "mismatch_tokens": 0.0,
        "mismatch_kl_k3": 0.0,
        "mismatch_kl_k1": 0.0,
        "mismatch_abs_logp_diff_max": 0.0,
        "tis_weight_mean": 0.0,
        "tis_clipped_fraction": 0.0,
    }


def _enumerated_samples(mu: list[float], copies: int) -> torch.Tensor:
    """Token ids whose empirical distribution is exactly mu (mu x copies integers)."""
    counts = [round(p * copies) for p in mu]
    assert sum(counts) == copies
    return torch.cat([torch.full((c,), v) for v, c in enumerate(counts)])


def test_k3_mean_is_kl_of_rollout_from_trainer():
    """Over samples distributed exactly as mu, mean k3 = KL(mu || pi) (float64 sum)."""
    mu = [0.5, 0.25, 0.125, 0.125]
    pi = [0.1, 0.2, 0.3, 0.4]
    tok = _enumerated_samples(mu, 8)
    logmu, logpi = torch.tensor(mu).log()[tok], torch.tensor(pi).log()[tok]
    m = mismatch_metrics(logpi, logmu, torch.ones_like(tok))
    kl = sum(a * math.log(a / b) for a, b in zip(mu, pi))
    assert m["mismatch_kl_k3"] == pytest.approx(kl, rel=1e-6)
    assert m["mismatch_kl_k1"] == pytest.approx(kl, rel=1e-6)  # k1 is unbiased too


def test_uncapped_weights_turn_rollout_samples_into_trainer_expectations():
    """With a cap above every ratio, sum over mu-samples of w f / n = E_pi[f]."""
    mu = [0.5, 0.25, 0.25]
    pi = [0.2, 0.3, 0.5]
    f = torch.tensor([1.0, -2.0, 4.0])
    tok = _enumerated_samples(mu, 4)
    w = truncated_is_weights(torch.tensor(pi).log()[tok], torch.tensor(mu).log()[tok], cap=100.0)
    assert float((w * f[tok]).mean()) == pytest.approx(sum(p * v for p, v in zip(pi, f.tolist())))
    # a cap of 1.5 truncates token 2 (ratio 2): the estimate is biased towards mu
    w_capped = truncated_is_weights(torch.tensor(pi).log()[tok], torch.tensor(mu).log()[tok], 1.5)
    assert float(w_capped.max()) == pytest.approx(1.5)
