"""kernels.mode x kernels.fused_lm_head inside MegatronPolicy: under the Triton
interpreter, on a tiny Qwen3 at TP=1 (DP=2) and TP=2, the log-probs, entropies and one
optimizer step through each kernel path equal the torch path (fp32, 1e-5). The torch
path itself is checked against transformers in test_train_step.py."""

from __future__ import annotations

import pytest
import torch
from conftest import four_row_batch, save_tiny_hf, spawn

LOSS = {"token_rule": "archer", "agg_mode": "token-mean", "kl_coef": 0.05}
PATHS = [("torch", False), ("triton", False), ("torch", True), ("triton", True)]


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_every_kernel_path_equals_the_torch_path(tmp_path, monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")  # inherited by the spawned workers
    hf_dir = save_tiny_hf("qwen3", tmp_path / "hf", seed=9)
    payload = {
        "hf_dir": str(hf_dir),
        "batch": four_row_batch(100, seed=21, width=10),
        "loss": LOSS,
        "optim": {"lr": 1e-2, "clip_grad": 0.5, "adam_eps": 1e-4, "weight_decay": 0.0},
        "micro_batch_tokens": 20,
        "temperature": 0.9,
        "tps": [1, 2],
        "paths": PATHS,
    }
    res = spawn("kernel_paths", 2, payload, tmp_path, timeout_s=600)
    names = ["torch", "triton", "torch+lm_head", "triton+lm_head"]
    for tp in (1, 2):
        ref = res[f"tp{tp}/torch"]
        mask = torch.tensor(payload["batch"]["response_mask"])
        assert (torch.tensor(ref["logprob"])[mask] < 0).all()
        assert (torch.tensor(ref["entropy"])[mask] > 0).all()
        for name in names[1:]:
            got = res[f"tp{tp}/{name}"]
            for key in ("logprob", "entropy"):
                d = (torch.tensor(got[key]) - torch.tensor(ref[key])).abs().max().item()
                assert d < 1e-5, (tp, name, key, d)
            assert abs(got["loss"] - ref["loss"]) < 1e-5, (tp, name)
            assert abs(got["grad_norm"] - ref["grad_norm"]) < 1e-5 * max(1, ref["grad_norm"])
            worst = max(
                (torch.tensor(w) - torch.tensor(ref["weights"][n])).abs().max().item()
                for n, w in got["weights"].items()
            )
            assert worst < 1e-5, (tp, name, worst)
            assert set(got["weights"]) == set(ref["weights"])
        # Without the fused head the output layer makes V_pad / tp logits; with it the
        # hidden states (H = 32) are handed over and no logits exist.
        assert ref["head_output_width"] == 128 // tp  # vocab 100 padded to 128 at any TP
        assert res[f"tp{tp}/triton+lm_head"]["head_output_width"] == 32
        # The step moved the weights (so equal weights are not equal because nothing changed).
        assert ref["grad_norm"] > 0
