"""An inline Qwen3-MoE (`model.arch.family: qwen3_moe`, issue 23): its MoE fields reach
the HF config (and transformers' Qwen3MoeConfig reads them), the dense families leave
them out, and the MoE checks at load name the bad key."""

from __future__ import annotations

from pathlib import Path

import pytest

from archer_mcore.config import ConfigError, load_config
from archer_mcore.model.hf_config import model_hf_config, shape_from_hf_config

ROOT = Path(__file__).resolve().parents[2]
DEMO = ROOT / "configs" / "demo_cpu.yaml"
MOE = [
    "model.arch.family=qwen3_moe",
    "model.arch.num_experts=6",
    "model.arch.num_experts_per_tok=3",
    "model.arch.moe_intermediate_size=40",
    "model.arch.norm_topk_prob=false",
]


def test_inline_moe_arch_reaches_the_hf_config() -> None:
    from transformers import AutoConfig

    cfg = load_config(DEMO, MOE)
    d = model_hf_config(cfg.model)
    assert d["model_type"] == "qwen3_moe"
    assert d["architectures"] == ["Qwen3MoeForCausalLM"]
    hf = AutoConfig.for_model(**d)
    assert (hf.num_experts, hf.num_experts_per_tok, hf.moe_intermediate_size) == (6, 3, 40)
    assert hf.norm_topk_prob is False
    shape = shape_from_hf_config(d)
    assert (shape.num_experts, shape.moe_top_k, shape.moe_ffn_hidden_size) == (6, 3, 40)
    assert shape.norm_topk_prob is False


def test_dense_family_leaves_the_moe_fields_out() -> None:
    d = model_hf_config(load_config(DEMO).model)
    assert d["model_type"] != "qwen3_moe"
    assert not {"num_experts", "num_experts_per_tok", "moe_intermediate_size",
                "norm_topk_prob"} & set(d)  # fmt: skip


@pytest.mark.parametrize(
    ("overrides", "match"),
    [
        (["parallel.expert_model_parallel_size=2"], r"expert_model_parallel_size = 2 needs an MoE"),
        (
            [*MOE, "model.arch.num_experts_per_tok=7"],
            r"num_experts_per_tok = 7 must be at most model.arch.num_experts = 6",
        ),
        (
            [*MOE, "parallel.expert_model_parallel_size=4"],
            r"expert_model_parallel_size = 4 must divide model.arch.num_experts = 6",
        ),
        (
            [*MOE, "parallel.tensor_model_parallel_size=2"],
            r"parallel.sequence_parallel must be true for an MoE model at "
            r"parallel.tensor_model_parallel_size = 2",
        ),
    ],
)
def test_moe_checks_name_the_key(overrides: list[str], match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        load_config(DEMO, overrides)
