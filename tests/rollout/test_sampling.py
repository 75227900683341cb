"""Top-k / top-p / temperature semantics of the sampler, hand-derived and empirical."""

from __future__ import annotations

import math

import pytest
import torch

from archer_mcore.rollout.sampling import sample_next_tokens, truncation_mask
from archer_mcore.rollout.types import SamplingParams


def test_top_p_hand_derived():
    # sorted probs 0.5, 0.2, 0.15, 0.1, 0.05 (shuffled positions);
    # mass before each: 0, 0.5, 0.7, 0.85, 0.95. top_p 0.6 keeps mass_before <= 0.6:
    # the 0.5 and 0.2 tokens.
    probs = torch.tensor([[0.15, 0.5, 0.05, 0.2, 0.1]])
    assert truncation_mask(probs, -1, 0.6).tolist() == [[False, True, False, True, False]]
    # top_p 0.8: mass_before 0.7 <= 0.8 also keeps the 0.15 token.
    assert truncation_mask(probs, -1, 0.8).tolist() == [[True, True, False, True, False]]
    # tiny top_p keeps only the most likely token.
    assert truncation_mask(probs, -1, 0.01).tolist() == [[False, True, False, False, False]]
    assert truncation_mask(probs, -1, 1.0).all()


def test_top_k_then_top_p_on_renormalised_probs():
    # top_k 2 keeps 0.4, 0.3 -> renormalised 4/7, 3/7. top_p 0.5: mass before the second
    # is 4/7 = 0.571 > 0.5 -> only the first survives. (Without renormalising, the mass
    # before it would be 0.4 <= 0.5 and both would survive: this pins the order.)
    probs = torch.tensor([[0.1, 0.4, 0.2, 0.3]])
    assert truncation_mask(probs, 2, 0.5).tolist() == [[False, True, False, False]]
    assert truncation_mask(probs, 2, 1.0).tolist() == [[False, True, False, True]]
    assert truncation_mask(probs, 3, 1.0).tolist() == [[False, True, True, True]]
    assert truncation_mask(probs, 0, 1.0).all() and truncation_mask(probs, 4, 1.0).all()


@pytest.mark.parametrize(
    ("temperature", "top_k", "top_p"),
    [(1.0, -1, 1.0), (0.7, 3, 1.0), (1.3, -1, 0.75), (0.9, 4, 0.8)],
)
def test_empirical_frequencies_and_logprobs(temperature, top_k, top_p):
    """20k draws from one row: frequencies match the float64 truncated distribution
    (within 5 binomial sigmas) and every logprob is log softmax(z / T) at the draw."""
    z = torch.tensor([2.0, 1.5, 1.0, 0.5, 0.0, -0.5, -1.0, -3.0], dtype=torch.float64)
    draws = 20000
    tokens, logprobs = sample_next_tokens(
        z.float().expand(draws, -1), temperature, top_k, top_p, torch.Generator().manual_seed(1)
    )
    # float64 reference distribution, built independently: sort, cut, renormalise.
    p = torch.softmax(z / temperature, dim=0)
    order = torch.argsort(p, descending=True)
    kept = order[: top_k if top_k > 0 else len(z)]
    q = p[kept] / p[kept].sum()
    cum = 0.0
    final = []
    for tok, mass in zip(kept.tolist(), q.tolist()):
        if cum <= top_p:
            final.append(tok)
        cum += mass
    ref = torch.zeros_like(p)
    ref[final] = p[final] / p[final].sum()
    freq = torch.bincount(tokens, minlength=len(z)).double() / draws
    sigma = torch.sqrt(ref * (1 - ref) / draws)
    assert torch.all((freq - ref).abs() <= 5 * sigma + 1e-12), (freq, ref)
    assert set(tokens.unique().tolist()) <= set(final)
    expected = torch.log_softmax(z / temperature, dim=0)[tokens]
    torch.testing.assert_close(logprobs.double(), expected, atol=1e-6, rtol=0)


def test_greedy_takes_argmax_and_untempered_logprob():
    g = torch.Generator().manual_seed(0)
    z = torch.randn(16, 50, generator=g) * 3
    tokens, logprobs = sample_next_tokens(z, 0.0, -1, 1.0)
    assert torch.equal(tokens, z.argmax(-1))
    expected = torch.log_softmax(z.double(), -1).gather(-1, tokens[:, None]).squeeze(-1)
    torch.testing.assert_close(logprobs.double(), expected, atol=1e-6, rtol=0)


def test_sampling_params_validation():
    with pytest.raises(ValueError, match="top_p"):
        SamplingParams(top_p=0.0)
    with pytest.raises(ValueError, match="temperature"):
        SamplingParams(temperature=-1.0)
    with pytest.raises(ValueError, match="max_new_tokens"):
        SamplingParams(max_new_tokens=0)
    with pytest.raises(ValueError, match="top_k"):
        SamplingParams(top_k=-2)
    assert SamplingParams(temperature=0.0).logprob_temperature == 1.0
    assert math.isclose(SamplingParams(temperature=0.6).logprob_temperature, 0.6)
