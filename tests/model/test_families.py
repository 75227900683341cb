"""The model-family registry (issue 23) and Qwen3-MoE's spec: config reading, the
TransformerConfig fields its settings give, HF <-> megatron conversion sharded by
TP x PP x EP (pure functions, bit-exact round trip, experts on the right EP rank), the
FP8 export names and the planner's counts against transformers' own models."""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest
import torch

from archer_mcore.config import ModelConfig, ParallelConfig
from archer_mcore.model.convert import hf_to_mcore_shard, mcore_shards_to_hf
from archer_mcore.model.families import FAMILIES, SUPPORTED_MODEL_TYPES, family_of
from archer_mcore.model.hf_config import shape_from_hf_config
from archer_mcore.plan.formulas import total_params
from archer_mcore.rollout.fp8_export import is_fp8_linear

TINY_MOE: dict[str, Any] = dict(
    model_type="qwen3_moe",
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
    tie_word_embeddings=False,
)


def _hf_model(cfg: dict[str, Any]) -> torch.nn.Module:
    from transformers import AutoConfig, AutoModelForCausalLM

    d = dict(cfg)
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(AutoConfig.for_model(d.pop("model_type"), **d))


def _saved_state(cfg: dict[str, Any], tmp_path) -> dict[str, torch.Tensor]:
    """The tensors of a random tiny model as save_pretrained writes them (per expert)."""
    from safetensors.torch import load_file

    _hf_model(cfg).save_pretrained(tmp_path)
    return load_file(str(tmp_path / "model.safetensors"))


def test_registry_is_keyed_by_model_type():
    assert SUPPORTED_MODEL_TYPES == ("qwen2", "qwen3", "qwen3_moe")
    assert all(FAMILIES[k].model_type == k for k in FAMILIES)
    with pytest.raises(ValueError, match="model_type 'llama' is not supported"):
        family_of("llama")


def test_qwen3_moe_shape_from_transformers_config():
    from transformers import AutoConfig

    d = dict(TINY_MOE)
    hf = AutoConfig.for_model(d.pop("model_type"), **d).to_dict()  # as config.json holds it
    s = shape_from_hf_config(hf)
    assert (s.num_experts, s.moe_ffn_hidden_size, s.moe_top_k, s.norm_topk_prob) == (4, 24, 2, True)
    assert s.qk_norm and not s.qkv_bias and s.is_moe
    assert not shape_from_hf_config({**TINY_MOE, "norm_topk_prob": False}).norm_topk_prob


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        ("decoder_sparse_step", 2, "decoder_sparse_step 2"),
        ("mlp_only_layers", [0], "mlp_only_layers"),
        ("num_experts_per_tok", 5, "num_experts_per_tok 5"),
        ("attention_bias", True, "attention_bias"),
    ],
)
def test_qwen3_moe_refuses_what_it_cannot_build(key, value, message):
    with pytest.raises(ValueError, match=message):
        shape_from_hf_config({**TINY_MOE, key: value})


def test_moe_settings_reach_the_transformer_config():
    """Each MoE setting changes the megatron fields (and megatron accepts them)."""
    from archer_mcore.model.build import resolve_build_choices, transformer_config

    shape = shape_from_hf_config(TINY_MOE)
    fam = family_of("qwen3_moe")
    base = fam.transformer_config(shape, ModelConfig(), ParallelConfig())
    assert base["moe_router_load_balancing_type"] == "none"  # off for RL by default
    assert base["moe_aux_loss_coeff"] == 0.0 and base["moe_z_loss_coeff"] is None
    assert base["moe_router_pre_softmax"] is False  # norm_topk_prob: softmax over the top-k
    assert base["num_moe_experts"] == 4 and base["moe_router_topk"] == 2
    on = ModelConfig(moe_aux_loss_coeff=0.01, moe_z_loss_coeff=0.001)
    got = fam.transformer_config(shape, on, ParallelConfig(expert_model_parallel_size=2))
    assert got["moe_router_load_balancing_type"] == "aux_loss"
    assert (got["moe_aux_loss_coeff"], got["moe_z_loss_coeff"]) == (0.01, 0.001)
    assert got["expert_model_parallel_size"] == 2
    no_norm = dataclasses.replace(shape, norm_topk_prob=False)
    assert fam.transformer_config(no_norm, ModelConfig(), ParallelConfig())["moe_router_pre_softmax"]
    choices = resolve_build_choices(ModelConfig(), ParallelConfig(), None, None, False)
    tc = transformer_config(shape, on, choices, tp=1, pp=1)
    assert tc.moe_aux_loss_coeff == 0.01 and tc.moe_token_dispatcher_type == "alltoall"
    with pytest.raises(ValueError, match="does not divide num_experts"):
        fam.transformer_config(shape, ModelConfig(), ParallelConfig(expert_model_parallel_size=3))
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="model.moe_token_dispatcher 'flex'"):
            fam.transformer_config(shape, ModelConfig(moe_token_dispatcher="flex"), ParallelConfig())


@pytest.mark.parametrize(("tp", "pp", "ep"), [(1, 1, 2), (2, 2, 2), (2, 1, 4)])
def test_moe_conversion_round_trip_is_bit_exact(tmp_path, tp, pp, ep):
    hf = _saved_state(TINY_MOE, tmp_path)
    shape = shape_from_hf_config(TINY_MOE)
    padded = shape.padded_vocab_size(tp)
    shards = {
        (t, p, e): hf_to_mcore_shard(
            hf.__getitem__, shape, tp=tp, pp=pp, tp_rank=t, pp_rank=p,
            padded_vocab=padded, ep=ep, ep_rank=e,
        )
        for t in range(tp) for p in range(pp) for e in range(ep)
    }  # fmt: skip
    back = mcore_shards_to_hf(shards, shape, tp=tp, pp=pp, ep=ep)
    assert sorted(back) == sorted(hf)
    assert all(torch.equal(back[k], hf[k]) for k in hf)
    # EP rank e holds experts [e E/ep, (e+1) E/ep) under local indices; TP splits rows
    per = 4 // ep
    last = shards[(0, pp - 1, ep - 1)]
    fc1 = last[f"decoder.layers.{2 // pp - 1}.mlp.experts.local_experts.{per - 1}.linear_fc1.weight"]
    gate = hf["model.layers.1.mlp.experts.3.gate_proj.weight"]
    assert torch.equal(fc1[: 24 // tp], gate[: 24 // tp])
    assert not any(f"local_experts.{per}." in k for k in last)


def test_fp8_names_of_qwen3_moe():
    assert is_fp8_linear("model.layers.3.mlp.experts.17.gate_proj.weight")
    assert is_fp8_linear("model.layers.3.mlp.experts.0.down_proj.weight")
    assert is_fp8_linear("model.layers.3.self_attn.q_proj.weight")
    assert not is_fp8_linear("model.layers.3.mlp.gate.weight")  # the router stays bf16
    assert not is_fp8_linear("model.layers.3.post_attention_layernorm.weight")


@pytest.mark.parametrize("model_type", ["qwen3", "qwen2", "qwen3_moe"])
def test_planner_parameter_count_equals_transformers(model_type):
    """total_params of the family's counts = the parameters transformers builds."""
    cfg = dict(TINY_MOE, model_type=model_type)
    if model_type == "qwen2":
        cfg.pop("head_dim")
    hf = _hf_model(cfg)
    n = sum(p.numel() for p in hf.parameters())
    assert total_params(shape_from_hf_config(cfg)) == n


def test_moe_active_weights_per_token_by_hand():
    """matmul weights one token passes through: attention 32x16x(4+4) + 4x16x32, the
    router 4x32 and 2 of the 4 experts (3 x 32 x 24 each), per layer; LM head 100x32."""
    from archer_mcore.plan.formulas import matmul_params_per_token

    shape = shape_from_hf_config(TINY_MOE)
    per_layer = 32 * 16 * 8 + 4 * 16 * 32 + 4 * 32 + 2 * 3 * 32 * 24
    assert matmul_params_per_token(shape) == 2 * per_layer + 100 * 32


def test_archer_convert_round_trips_a_moe_checkpoint(tmp_path):
    """`archer convert`'s directory functions (TP 2, EP 1: every expert in each shard)
    write a Qwen3-MoE checkpoint back bitwise."""
    from safetensors.torch import load_file

    from archer_mcore.model.convert_dirs import hf_to_mcore_dir, mcore_dir_to_hf

    hf = _saved_state(TINY_MOE, tmp_path / "hf")
    mc = hf_to_mcore_dir(tmp_path / "hf", tmp_path / "mc", tp=2, pp=2)
    back = load_file(str(mcore_dir_to_hf(mc, tmp_path / "back") / "model.safetensors"))
    assert sorted(back) == sorted(hf)
    assert all(torch.equal(back[k], hf[k]) for k in hf)
