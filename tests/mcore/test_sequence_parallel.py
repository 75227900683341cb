"""parallel.sequence_parallel reaches megatron: at TP=2 on gloo, logits, log-probs and
one optimizer step with sequence parallelism on equal those with it off (1e-5), with
micro-batch lengths padded to a multiple of TP (the batch's rows have odd lengths)."""

from __future__ import annotations

import pytest
import torch
from conftest import four_row_batch, save_tiny_hf, spawn


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_sequence_parallel_on_equals_off_at_tp2(tmp_path):
    hf_dir = save_tiny_hf("qwen3", tmp_path / "hf", seed=4)
    payload = {
        "hf_dir": str(hf_dir),
        "batch": four_row_batch(100, seed=31, width=9),  # lengths 7, 5, 7, 7: all odd
        "logits_ids": torch.randint(
            1, 100, (2, 6), generator=torch.Generator().manual_seed(1)
        ).tolist(),
        "loss": {"token_rule": "archer", "agg_mode": "token-mean", "kl_coef": 0.05},
        "optim": {"lr": 1e-2, "clip_grad": 0.5, "adam_eps": 1e-4, "weight_decay": 0.0},
        "micro_batch_tokens": 20,
        "temperature": 0.9,
    }
    res = spawn("sequence_parallel", 2, payload, tmp_path)
    off, on, on_head = res["sp0"], res["sp1"], res["sp1_lm_head"]
    assert (off["config_sequence_parallel"], on["config_sequence_parallel"]) == (False, True)
    assert (off["seq_multiple"], on["seq_multiple"]) == (1, 2)
    lo, ln = torch.tensor(off["logits"]), torch.tensor(on["logits"])
    assert lo.shape == (2, 6, 128) and (lo - ln).abs().max().item() < 1e-5
    for other in (on, on_head):
        for key in ("logprob", "entropy"):
            d = (torch.tensor(other[key]) - torch.tensor(off[key])).abs().max().item()
            assert d < 1e-5, key
        assert abs(other["loss"] - off["loss"]) < 1e-5
        assert abs(other["grad_norm"] - off["grad_norm"]) < 1e-5 * max(1.0, off["grad_norm"])
        worst = max(
            (torch.tensor(w) - torch.tensor(off["weights"][n])).abs().max().item()
            for n, w in other["weights"].items()
        )
        assert worst < 1e-5, worst
    assert off["grad_norm"] > 0
