"""`archer plan` sizes what the trainer builds: the demo config, under several
settings, built into a MegatronPolicy the way `archer train` builds it (2 gloo
processes) and planned for the same machine; both sides make the same choices of
sequence parallelism, FP8 (recipe, parameter gather) and logits path."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import spawn, tiny_hf_config

ROOT = Path(__file__).resolve().parents[2]
CASES = {
    # TP2 with SP; the Triton fused LM head (resolving the path runs no kernel).
    "tp2_sp_lm_head": [
        "parallel.tensor_model_parallel_size=2",
        "parallel.sequence_parallel=true",
        "kernels.mode=triton",
        "kernels.fused_lm_head=true",
    ],
    # TP1 x DP2, auto kernels (torch here), FP8 asked for: TE is absent, so BF16 local.
    "tp1_fp8_auto": [
        "model.transformer_impl=transformer_engine",
        "model.fp8=delayed",
        "kernels.mode=auto",
    ],
    "tp2_triton": ["parallel.tensor_model_parallel_size=2", "kernels.mode=triton"],
}


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_planner_and_builder_agree_on_every_choice(tmp_path):
    payload = {
        "config": str(ROOT / "configs" / "demo_cpu.yaml"),
        "cases": CASES,
        "hf_config": tiny_hf_config("qwen3"),
    }
    res = spawn("plan_agrees", 2, payload, tmp_path)
    for name, r in res.items():
        assert r["same_choices"], (name, r)
        b, p = r["built"], r["planned"]
        assert b["sequence_parallel"] == p["sequence_parallel"], name
        assert (b["fp8"] is not None) == p["fp8"], name
        lm_head_built = b["logits_width"] == 32  # hidden size: the head hands over hidden states
        assert lm_head_built == (p["logits_path"] == "fused_lm_head"), name
    sp = res["tp2_sp_lm_head"]
    assert sp["built"]["sequence_parallel"] and sp["built"]["seq_multiple"] == 2
    assert sp["built"]["kernel_path"] == "triton+lm_head"
    assert sp["planned"]["logits_path"] == "fused_lm_head"
    fp8 = res["tp1_fp8_auto"]
    assert fp8["built"]["spec"] == "local" and fp8["built"]["fp8"] is None  # no TE here
    assert fp8["built"]["kernel_path"] == "torch"  # auto without CUDA
    assert fp8["planned"]["logits_path"] == "chunked" and not fp8["planned"]["fp8"]
    assert res["tp2_triton"]["planned"]["logits_path"] == "fused"
    assert res["tp2_triton"]["built"]["logits_width"] == 64  # V_pad / tp logits (128 / 2)
