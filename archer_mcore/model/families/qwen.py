"""Qwen2 and Qwen3 (dense): one module, as they differ by two flags.

Qwen2 has biases on the q/k/v projections; Qwen3 has none and applies a per-head
RMSNorm (weight [head_dim]) to q and k. Both: RMSNorm, SwiGLU MLP
(gate/up/down_proj), RoPE (plain or YaRN), GQA, tied or untied embeddings.

The attention rules, the dense reader and the dense counts are reused by the Qwen MoE
families (`qwen3_moe.py`), whose attention is Qwen3's.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from archer_mcore.model.families.base import ModelFamily, ParamRule, PlannerCounts
from archer_mcore.model.shape import ModelShape, rope_from_hf

if TYPE_CHECKING:
    from archer_mcore.config import ModelConfig, ParallelConfig
    from archer_mcore.model.fp8 import PrecisionChoices

#: HF names of the attention projections SGLang runs in FP8.
ATTENTION_FP8 = r"self_attn\.(q|k|v|o)_proj"


# ------------------------------------------------------------------ HF config
def read_dense_shape(cfg: Mapping[str, Any], qkv_bias: bool, qk_norm: bool) -> ModelShape:
    """The attention / dense-MLP part of a Qwen config.json; ValueError naming the key
    for unsupported options."""
    model_type = cfg.get("model_type")
    act = cfg.get("hidden_act", "silu")
    if act != "silu":
        raise ValueError(f"hidden_act {act!r} is not supported (SwiGLU needs 'silu')")
    if not qkv_bias and cfg.get("attention_bias", False):
        raise ValueError(f"attention_bias=True is not supported for {model_type}")
    if cfg.get("use_sliding_window", False):
        raise ValueError("use_sliding_window=True is not supported")
    heads = int(cfg["num_attention_heads"])
    kv = int(cfg.get("num_key_value_heads") or heads)
    if heads % kv != 0:
        raise ValueError(
            f"num_attention_heads {heads} is not a multiple of num_key_value_heads {kv}"
        )
    hidden = int(cfg["hidden_size"])
    head_dim = int(cfg.get("head_dim") or hidden // heads)
    theta, scaling = rope_from_hf(cfg)
    return ModelShape(
        model_type=str(model_type),
        vocab_size=int(cfg["vocab_size"]),
        hidden_size=hidden,
        ffn_hidden_size=int(cfg["intermediate_size"]),
        num_layers=int(cfg["num_hidden_layers"]),
        num_heads=heads,
        num_kv_heads=kv,
        head_dim=head_dim,
        rope_theta=theta,
        rms_eps=float(cfg.get("rms_norm_eps", 1e-6)),
        tie_embeddings=bool(cfg.get("tie_word_embeddings", False)),
        qkv_bias=qkv_bias,
        qk_norm=qk_norm,
        max_position_embeddings=int(cfg.get("max_position_embeddings", 32768)),
        initializer_range=float(cfg.get("initializer_range", 0.02)),
        rope_scaling=scaling,
    )


def _read_qwen2(cfg: Mapping[str, Any]) -> ModelShape:
    return read_dense_shape(cfg, qkv_bias=True, qk_norm=False)


def _read_qwen3(cfg: Mapping[str, Any]) -> ModelShape:
    return read_dense_shape(cfg, qkv_bias=False, qk_norm=True)


# ------------------------------------------------------------------ megatron
def attention_config(shape: ModelShape) -> dict[str, Any]:
    """TransformerConfig fields of the attention: q/k/v bias (Qwen2), q/k norm (Qwen3)."""
    return {"add_qkv_bias": shape.qkv_bias, "qk_layernorm": shape.qk_norm}


def _dense_config(
    shape: ModelShape, model: ModelConfig, parallel: ParallelConfig
) -> dict[str, Any]:
    return attention_config(shape)


def _dense_layer_spec(precision: PrecisionChoices, shape: ModelShape) -> Any:
    return precision.build_layer_spec(shape.qk_norm)


# ------------------------------------------------------------------ weights
def attention_rules(shape: ModelShape, te_names: bool) -> list[ParamRule]:
    """The input norm and the attention of one layer, in HF parameter order."""
    attn_norm = (
        "self_attention.linear_qkv.layer_norm_weight" if te_names else "input_layernorm.weight"
    )
    rules = [ParamRule(attn_norm, ("input_layernorm.weight",), "replicated")]
    rules.append(
        ParamRule(
            "self_attention.linear_qkv.weight",
            ("self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight"),
            "qkv",
        )
    )
    if shape.qkv_bias:
        rules.append(
            ParamRule(
                "self_attention.linear_qkv.bias",
                ("self_attn.q_proj.bias", "self_attn.k_proj.bias", "self_attn.v_proj.bias"),
                "qkv",
            )
        )
    rules.append(
        ParamRule("self_attention.linear_proj.weight", ("self_attn.o_proj.weight",), "col")
    )
    if shape.qk_norm:
        rules.append(
            ParamRule(
                "self_attention.q_layernorm.weight", ("self_attn.q_norm.weight",), "replicated"
            )
        )
        rules.append(
            ParamRule(
                "self_attention.k_layernorm.weight", ("self_attn.k_norm.weight",), "replicated"
            )
        )
    return rules


def dense_layer_rules(shape: ModelShape, te_names: bool = False) -> list[ParamRule]:
    """Rules for one dense decoder layer (attention, then the SwiGLU MLP)."""
    mlp_norm = "mlp.linear_fc1.layer_norm_weight" if te_names else "pre_mlp_layernorm.weight"
    rules = attention_rules(shape, te_names)
    rules.append(ParamRule(mlp_norm, ("post_attention_layernorm.weight",), "replicated"))
    rules.append(
        ParamRule(
            "mlp.linear_fc1.weight", ("mlp.gate_proj.weight", "mlp.up_proj.weight"), "gate_up"
        )
    )
    rules.append(ParamRule("mlp.linear_fc2.weight", ("mlp.down_proj.weight",), "col"))
    return rules


def dense_hf_tensor_shape(name: str, shape: ModelShape) -> tuple[int, ...]:
    """Shape of an HF Qwen2/Qwen3 tensor, from its name; KeyError for an unknown name."""
    h, hd, f = shape.hidden_size, shape.head_dim, shape.ffn_hidden_size
    q, kv = shape.num_heads * hd, shape.num_kv_heads * hd
    table = {
        "embed_tokens.weight": (shape.vocab_size, h),
        "lm_head.weight": (shape.vocab_size, h),
        "q_proj.weight": (q, h),
        "k_proj.weight": (kv, h),
        "v_proj.weight": (kv, h),
        "q_proj.bias": (q,),
        "k_proj.bias": (kv,),
        "v_proj.bias": (kv,),
        "o_proj.weight": (h, q),
        "q_norm.weight": (hd,),
        "k_norm.weight": (hd,),
        "gate_proj.weight": (f, h),
        "up_proj.weight": (f, h),
        "down_proj.weight": (h, f),
        "layernorm.weight": (h,),
        "norm.weight": (h,),
    }
    for suffix, s in table.items():
        if name.endswith(suffix):
            return s
    raise KeyError(f"unknown HF tensor name {name!r}")


# ------------------------------------------------------------------ planner
def _dense_mlp_params(m: ModelShape, gated: bool = True) -> int:
    return (3 if gated else 2) * m.hidden_size * m.ffn_hidden_size


def _dense_mlp_matmul_params(m: ModelShape) -> int:
    return 3 * m.hidden_size * m.ffn_hidden_size


def _dense_mlp_activation_bytes(m: ModelShape, gated: bool) -> float:
    """The fc1 output (2 f, twice when gated) and the fc2 input (2 f)."""
    f = m.ffn_hidden_size
    return 2 * f * (2 if gated else 1) + 2 * f


DENSE_COUNTS = PlannerCounts(
    mlp_params=_dense_mlp_params,
    mlp_matmul_params=_dense_mlp_matmul_params,
    mlp_active_matmul_params=_dense_mlp_matmul_params,
    mlp_activation_bytes=_dense_mlp_activation_bytes,
)

_DENSE_FP8 = re.compile(
    rf"^model\.layers\.\d+\.({ATTENTION_FP8}|mlp\.(gate|up|down)_proj)\.weight$"
)

QWEN2 = ModelFamily(
    model_type="qwen2",
    architecture="Qwen2ForCausalLM",
    read_shape=_read_qwen2,
    layer_spec=_dense_layer_spec,
    transformer_config=_dense_config,
    layer_rules=dense_layer_rules,
    hf_tensor_shape=dense_hf_tensor_shape,
    fp8_linear=_DENSE_FP8,
    counts=DENSE_COUNTS,
    inline_config={"hidden_act": "silu", "attention_bias": True},
)

QWEN3 = ModelFamily(
    model_type="qwen3",
    architecture="Qwen3ForCausalLM",
    read_shape=_read_qwen3,
    layer_spec=_dense_layer_spec,
    transformer_config=_dense_config,
    layer_rules=dense_layer_rules,
    hf_tensor_shape=dense_hf_tensor_shape,
    fp8_linear=_DENSE_FP8,
    counts=DENSE_COUNTS,
    inline_config={"hidden_act": "silu", "attention_bias": False},
)
