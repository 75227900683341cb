"""The torch reference of entropy/log-prob (archer_mcore.algo.entropy), sharded and
unsharded, against plain float64 autograd through torch.log_softmax, and a float64
gradient check."""

from __future__ import annotations

import pytest
import torch
from conftest import spawn

from archer_mcore.algo.entropy import vocab_parallel_entropy_and_logprob


def _reference(logits: torch.Tensor, tokens: torch.Tensor, vocab: int, t: float, g_ent, g_lp):
    """float64 autograd on the unpadded columns (gradient zero on padding columns)."""
    z = logits.double().clone().requires_grad_(True)
    logp_all = torch.log_softmax(z[:, :vocab] / t, dim=-1)
    ent = -(logp_all.exp() * logp_all).sum(-1)
    lp = logp_all.gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
    ((ent * g_ent.double()).sum() + (lp * g_lp.double()).sum()).backward()
    return ent.detach().float(), lp.detach().float(), z.grad.float()


def test_unsharded_equals_reference_and_ignores_padding():
    torch.manual_seed(0)
    logits = 3 * torch.randn(7, 40)
    logits[:, 33:] = 50.0  # padding columns with huge logits must not count
    tokens = torch.randint(0, 33, (7,))
    g_ent, g_lp = torch.randn(7), torch.randn(7)
    z = logits.clone().requires_grad_(True)
    ent, lp = vocab_parallel_entropy_and_logprob(
        z, tokens, 0, None, temperature=0.7, vocab_size=33, chunk_rows=2
    )
    ((ent * g_ent).sum() + (lp * g_lp).sum()).backward()
    r_ent, r_lp, r_grad = _reference(logits, tokens, 33, 0.7, g_ent, g_lp)
    assert torch.allclose(ent, r_ent, atol=1e-5) and torch.allclose(lp, r_lp, atol=1e-5)
    assert torch.allclose(z.grad, r_grad, atol=1e-5)
    assert not z.grad[:, 33:].any()


def test_float64_gradcheck():
    torch.manual_seed(1)
    z = torch.randn(4, 9, dtype=torch.float64, requires_grad=True)
    tokens = torch.tensor([0, 3, 7, 5])  # column 8 is padding

    def f(x):
        return vocab_parallel_entropy_and_logprob(x, tokens, 0, None, temperature=1.3, vocab_size=8)

    assert torch.autograd.gradcheck(f, (z,))


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_tp2_matches_single_process_values_and_gradients(tmp_path):
    torch.manual_seed(2)
    n, vocab, padded = 11, 50, 64  # rank 1 holds ids 32..63, of which 50..63 are padding
    logits = 4 * torch.randn(n, padded)
    tokens = torch.randint(0, vocab, (n,))
    tokens[:3] = torch.tensor([0, 31, 32])  # shard boundaries
    tokens[3] = vocab - 1
    g_ent, g_lp = torch.randn(n), torch.randn(n)
    t = 0.8
    payload = {
        "logits": logits.tolist(),
        "tokens": tokens.tolist(),
        "g_ent": g_ent.tolist(),
        "g_lp": g_lp.tolist(),
        "temperature": t,
        "vocab_size": vocab,
    }
    res = spawn("vocab_parallel", 2, payload, tmp_path)
    r_ent, r_lp, r_grad = _reference(logits, tokens, vocab, t, g_ent, g_lp)
    assert res["entropy_same_on_all_ranks"]
    assert torch.allclose(torch.tensor(res["entropy"]), r_ent, atol=1e-5, rtol=0)
    assert torch.allclose(torch.tensor(res["logprob"]), r_lp, atol=1e-5, rtol=0)
    assert torch.allclose(torch.tensor(res["grad"]), r_grad, atol=1e-5, rtol=0)
