"""Qwen3-MoE on megatron-core 0.16.1 (issue 23 items 1-2): megatron's MoE GPTModel
built from a tiny random transformers `Qwen3MoeForCausalLM` reproduces its logits and
log-probs (to 1e-4) at EP 1 and 2, TP 2 and PP 2 on 2 gloo processes (the all-to-all
token dispatcher; "flex" needs DeepEP on GPUs), and exports every HF tensor back
bitwise."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import moe_workers
import pytest
import torch
import torch.multiprocessing as mp
from conftest import free_port

TINY_MOE: dict[str, Any] = dict(
    vocab_size=100,
    hidden_size=32,
    intermediate_size=48,
    moe_intermediate_size=24,
    num_experts=4,
    num_experts_per_tok=2,
    norm_topk_prob=True,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    max_position_embeddings=128,
    rms_norm_eps=1e-5,
    rope_theta=50000.0,
    initializer_range=0.2,
    tie_word_embeddings=False,
)


def save_tiny_moe(out_dir: Path, seed: int = 0, **overrides: Any) -> Path:
    """A random tiny Qwen3MoeForCausalLM saved with save_pretrained (float32; per-expert
    tensors on disk). Norms and the router are randomised (the router at std 1, so
    that the top-k choice differs between tokens and a swapped expert would show)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = AutoConfig.for_model("qwen3_moe", **{**TINY_MOE, **overrides})
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg, attn_implementation="eager").float().eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1.0 + 0.3 * torch.randn_like(p))
            elif name.endswith("mlp.gate.weight"):
                p.normal_(0.0, 1.0)
    model.save_pretrained(out_dir)
    return out_dir


def hf_logits(model_dir: Path, ids: torch.Tensor) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(
        model_dir, dtype=torch.float32, attn_implementation="eager"
    )
    with torch.no_grad():
        return model.eval()(ids).logits


def spawn_moe(world: int, payload: dict[str, Any], tmp: Path) -> dict[str, Any]:
    result = tmp / "moe_result.json"
    mp.start_processes(
        moe_workers.entry,
        args=(world, free_port(), "moe_parity", payload, str(result)),
        nprocs=world,
        join=True,
        start_method="spawn",
    )
    return json.loads(result.read_text())


@pytest.mark.slow
@pytest.mark.timeout(240)
@pytest.mark.parametrize("norm_topk_prob", [True, False])
def test_moe_matches_transformers_at_ep_tp_pp(tmp_path, norm_topk_prob):
    d = save_tiny_moe(tmp_path / "moe", seed=3, norm_topk_prob=norm_topk_prob)
    torch.manual_seed(0)
    ids = torch.randint(0, 100, (2, 9))
    layouts = [
        {"tp": 1, "pp": 1, "ep": 1, "dispatcher": "alltoall"},
        {"tp": 1, "pp": 1, "ep": 2, "dispatcher": "alltoall"},
        {"tp": 2, "pp": 1, "ep": 1, "dispatcher": "alltoall"},
        {"tp": 1, "pp": 2, "ep": 1, "dispatcher": "alltoall"},
    ]
    if not norm_topk_prob:  # the router's other branch: one layout is enough
        layouts = layouts[1:2]
    payload = {
        "dir": str(d),
        "input_ids": ids.tolist(),
        "logits": hf_logits(d, ids).tolist(),
        "layouts": layouts,
    }
    res = spawn_moe(2, payload, tmp_path)
    for lay in layouts:
        r = res[f"tp{lay['tp']}pp{lay['pp']}ep{lay['ep']}/{lay['dispatcher']}"]
        assert r["dispatcher"] == lay["dispatcher"], r
        assert r["local_experts"] == 4 // lay["ep"], r  # EP splits the experts
        assert 0 <= r["max_abs_diff"] < 1e-4, (lay, r)
        assert 0 <= r["logprob_abs_diff"] < 1e-4, (lay, r)
        assert r["export_count"] == r["hf_count"], (lay, r)
        assert r["export_wrong"] == 0, (lay, r)
