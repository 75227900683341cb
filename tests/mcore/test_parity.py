"""megatron GPTModel built from HF configs and converted HF weights reproduces
transformers' own float32 logits, under TP, PP and TP x PP (4 gloo processes)."""

from __future__ import annotations

import pytest
import torch
from conftest import hf_logits, save_tiny_hf, spawn


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_logits_match_transformers_and_export_is_exact(tmp_path):
    torch.manual_seed(0)
    ids = torch.randint(0, 100, (2, 9))
    models = {}
    for mt in ("qwen2", "qwen3"):
        d = save_tiny_hf(mt, tmp_path / mt, seed=1 if mt == "qwen2" else 2)
        models[mt] = {"dir": str(d), "logits": hf_logits(d, ids).tolist()}
    layouts = [(1, 1), (2, 1), (1, 2), (2, 2)]
    res = spawn(
        "parity", 4, {"input_ids": ids.tolist(), "models": models, "layouts": layouts}, tmp_path
    )
    for tp, pp in layouts:
        for mt in models:
            r = res[f"tp{tp}pp{pp}/{mt}"]
            assert r["reporting_ranks"] == 4 // pp, (tp, pp, mt, r)  # every last-stage rank
            assert r["max_abs_diff"] < 1e-4, (tp, pp, mt, r)
            # Export streams every HF tensor (tied qwen2 has no lm_head), bitwise equal.
            assert r["export_count"] == r["hf_count"], (tp, pp, mt, r)
            assert r["export_wrong"] == 0, (tp, pp, mt, r)
