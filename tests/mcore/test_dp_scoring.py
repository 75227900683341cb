"""Scoring passes sharded over data parallelism: at DP=2 each rank's forward sees half
the rows, and the gathered log-probs equal the DP=1 run."""

from __future__ import annotations

import pytest
import torch
from conftest import save_tiny_hf, spawn


def _batch(vocab: int, rows: int = 7) -> dict:
    """An odd number of rows (the shares differ by one), mixed prompt/response lengths."""
    g = torch.Generator().manual_seed(11)
    prompt = torch.randint(1, 5, (rows,), generator=g)
    resp = torch.randint(1, 7, (rows,), generator=g)
    ids = torch.randint(1, vocab, (rows, 12), generator=g)
    mask = torch.arange(6).unsqueeze(0) < resp.unsqueeze(1)
    return {
        "input_ids": ids.tolist(),
        "prompt_lengths": prompt.tolist(),
        "response_mask": mask.tolist(),
        "old_logp": torch.zeros(rows, 6).tolist(),
        "advantages": torch.zeros(rows).tolist(),
    }


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_dp2_scores_half_the_rows_each_and_matches_dp1(tmp_path):
    hf_dir = save_tiny_hf("qwen3", tmp_path / "hf", seed=3)
    payload = {
        "hf_dir": str(hf_dir),
        "batch": _batch(100),
        "optim": {"lr": 1e-3},
        "micro_batch_tokens": 24,  # several micro-batches per rank
        "temperature": 0.8,
    }
    (tmp_path / "dp1").mkdir()
    one = spawn("dp_scoring", 1, payload, tmp_path / "dp1")
    two = spawn("dp_scoring", 2, payload, tmp_path)
    assert one["dp"] == 1 and two["dp"] == 2
    # 7 rows: rank 0 scores rows 0, 2, 4, 6 and rank 1 rows 1, 3, 5 (per pass).
    assert one["rows_seen"] == [{"policy": 7, "reference": 7}]
    assert two["rows_seen"] == [{"policy": 4, "reference": 4}, {"policy": 3, "reference": 3}]
    assert two["same_on_all_ranks"]
    for key in ("logprob", "entropy", "ref_logprob"):
        a, b = torch.tensor(one[key]), torch.tensor(two[key])
        assert a.shape == (7, 6)
        assert (a - b).abs().max().item() < 1e-6, key
    mask = torch.tensor(payload["batch"]["response_mask"])
    assert (torch.tensor(one["logprob"])[mask] < 0).all()  # real log-probs, zero elsewhere
    assert (torch.tensor(one["logprob"])[~mask] == 0).all()
