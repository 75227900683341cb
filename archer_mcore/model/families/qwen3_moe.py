"""Qwen3-MoE (Qwen3-30B-A3B, Qwen3-235B-A22B): Qwen3's attention, every layer's MLP a
mixture of routed SwiGLU experts, no shared experts.

HF (transformers 5.25 `Qwen3MoeSparseMoeBlock`): router logits = gate(x) [E]; p =
softmax(logits) in fp32; the top-k experts by p, weighted by their p, renormalised to
sum 1 when ``norm_topk_prob`` (Qwen3-30B-A3B and 235B-A22B: true). On disk each expert
is ``mlp.experts.{e}.{gate,up,down}_proj.weight`` and the router ``mlp.gate.weight``
[E, hidden] (transformers fuses the experts into 3-D tensors in memory only).

megatron-core 0.16.1: `MoELayer` with `TopKRouter` (score function softmax; with
norm_topk_prob the softmax over the top-k logits, `moe_router_pre_softmax=False`,
which is the renormalised top-k of the full softmax; without, the full softmax then
top-k, `moe_router_pre_softmax=True`) in fp32, and `SequentialMLP` experts (one
megatron MLP per local expert, ``mlp.experts.local_experts.{j}``). Expert parallelism
(`parallel.expert_model_parallel_size` = EP) gives EP rank r the experts
[r E/EP, (r+1) E/EP); expert tensor parallelism is megatron's default (= TP). The
token dispatcher is `model.moe_token_dispatcher`: "alltoall" (runs on the CPU with gloo
through `parallel/cpu_compat.py`) or "flex" (DeepEP's fused all-to-all, GPUs with DeepEP
only: refused without CUDA, untested here). megatron's "allgather" dispatcher refuses
variable sequence lengths, which the trainer's token-budget micro-batches need.

Load balancing is off by default, as RL recipes on megatron do: slime's Qwen3-30B-A3B
recipe (scripts/models/qwen3-30B-A3B.sh) sets ``--moe-aux-loss-coeff 0``, and verl's
megatron bridge (mbridge models/qwen3moe.py) sets ``moe_router_load_balancing_type=
"none"  # default None for RL``. `model.moe_aux_loss_coeff` > 0 turns megatron's
aux loss on ("aux_loss", per micro-batch); `model.moe_z_loss_coeff` > 0 the router
z-loss. Not supported (ValueError naming the key): ``decoder_sparse_step`` != 1 and
non-empty ``mlp_only_layers`` (dense layers between MoE layers; no released Qwen3-MoE
uses them).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import replace
from typing import TYPE_CHECKING, Any

from archer_mcore.model.families.base import ModelFamily, ParamRule, PlannerCounts
from archer_mcore.model.families.qwen import (
    ATTENTION_FP8,
    attention_config,
    attention_rules,
    dense_hf_tensor_shape,
    read_dense_shape,
)
from archer_mcore.model.shape import ModelShape

if TYPE_CHECKING:
    from archer_mcore.config import ModelConfig, ParallelConfig
    from archer_mcore.model.fp8 import PrecisionChoices

#: the megatron name of local expert j's weights, formatted with `local=j`
EXPERT_FC1 = "mlp.experts.local_experts.{local}.linear_fc1.weight"
EXPERT_FC2 = "mlp.experts.local_experts.{local}.linear_fc2.weight"
#: megatron's dispatchers for variable-length micro-batches: its "allgather" one refuses
#: `variable_seq_lengths` (TransformerConfig.__post_init__), which the trainer needs
TOKEN_DISPATCHERS = ("alltoall", "flex")


def read_shape(cfg: Mapping[str, Any]) -> ModelShape:
    """A Qwen3-MoE config.json -> `ModelShape` (attention as Qwen3's)."""
    sparse_step = int(cfg.get("decoder_sparse_step", 1) or 1)
    if sparse_step != 1:
        raise ValueError(
            f"decoder_sparse_step {sparse_step} is not supported (only 1: every layer MoE)"
        )
    if cfg.get("mlp_only_layers"):
        raise ValueError(
            f"mlp_only_layers {cfg['mlp_only_layers']!r} is not supported (only []: "
            "every layer MoE)"
        )
    experts = cfg.get("num_experts", cfg.get("num_local_experts"))
    if not experts or int(experts) < 1:
        raise ValueError(f"num_experts {experts!r} must be a positive number of experts")
    top_k = int(cfg.get("num_experts_per_tok", 8))
    if not 1 <= top_k <= int(experts):
        raise ValueError(f"num_experts_per_tok {top_k} must be in [1, num_experts={experts}]")
    dense = read_dense_shape(cfg, qkv_bias=False, qk_norm=True)
    return replace(
        dense,
        num_experts=int(experts),
        moe_ffn_hidden_size=int(cfg.get("moe_intermediate_size", 768)),
        moe_top_k=top_k,
        norm_topk_prob=bool(cfg.get("norm_topk_prob", False)),
    )


def transformer_config(
    shape: ModelShape, model: ModelConfig, parallel: ParallelConfig
) -> dict[str, Any]:
    """megatron's MoE fields for the shape and the config's MoE settings."""
    if model.moe_token_dispatcher not in TOKEN_DISPATCHERS:
        raise ValueError(
            f"model.moe_token_dispatcher {model.moe_token_dispatcher!r}: use one of "
            f"{TOKEN_DISPATCHERS}"
        )
    import torch  # here, not at module level: `archer --help` and `config show` load no torch

    if model.moe_token_dispatcher == "flex" and not torch.cuda.is_available():
        raise ValueError(
            "model.moe_token_dispatcher 'flex' needs GPUs with DeepEP installed; use "
            "'alltoall' on the CPU"
        )
    ep = parallel.expert_model_parallel_size
    if shape.num_experts % ep != 0:
        raise ValueError(
            f"parallel.expert_model_parallel_size {ep} does not divide num_experts "
            f"{shape.num_experts}"
        )
    aux = float(model.moe_aux_loss_coeff)
    z = float(model.moe_z_loss_coeff)
    flex = {"moe_flex_dispatcher_backend": "deepep"} if model.moe_token_dispatcher == "flex" else {}
    return {
        **attention_config(shape),
        **flex,
        "num_moe_experts": shape.num_experts,
        "moe_ffn_hidden_size": shape.moe_ffn_hidden_size,
        "moe_router_topk": shape.moe_top_k,
        "moe_router_score_function": "softmax",
        "moe_router_pre_softmax": not shape.norm_topk_prob,
        "moe_router_dtype": "fp32",
        "moe_router_load_balancing_type": "aux_loss" if aux > 0 else "none",
        "moe_aux_loss_coeff": aux,
        "moe_z_loss_coeff": z if z > 0 else None,
        "moe_token_dispatcher_type": model.moe_token_dispatcher,
        "moe_grouped_gemm": False,
        "expert_model_parallel_size": ep,
    }


def layer_spec(precision: PrecisionChoices, shape: ModelShape) -> Any:
    return precision.build_layer_spec(shape.qk_norm, num_experts=shape.num_experts)


def layer_rules(shape: ModelShape, te_names: bool = False) -> list[ParamRule]:
    """Attention (Qwen3's), the pre-MLP norm (a module of its own in megatron's MoE
    layer, with either spec), the router and each expert's fc1 / fc2 (`expert` = its
    global index; the megatron name is formatted with the EP rank's local index)."""
    rules = attention_rules(shape, te_names)
    rules.append(
        ParamRule("pre_mlp_layernorm.weight", ("post_attention_layernorm.weight",), "replicated")
    )
    rules.append(ParamRule("mlp.router.weight", ("mlp.gate.weight",), "replicated"))
    for e in range(shape.num_experts):
        hf = f"mlp.experts.{e}."
        rules.append(
            ParamRule(
                EXPERT_FC1, (hf + "gate_proj.weight", hf + "up_proj.weight"), "gate_up", expert=e
            )
        )
        rules.append(ParamRule(EXPERT_FC2, (hf + "down_proj.weight",), "col", expert=e))
    return rules


_EXPERT = re.compile(r"mlp\.experts\.\d+\.(gate|up|down)_proj\.weight$")


def hf_tensor_shape(name: str, shape: ModelShape) -> tuple[int, ...]:
    h, f = shape.hidden_size, shape.moe_ffn_hidden_size
    m = _EXPERT.search(name)
    if m:
        return (h, f) if m.group(1) == "down" else (f, h)
    if name.endswith("mlp.gate.weight"):
        return (shape.num_experts, h)
    return dense_hf_tensor_shape(name, shape)


# ------------------------------------------------------------------ planner
def _mlp_params(m: ModelShape, gated: bool = True) -> int:
    """All experts (2 or 3 matrices of hidden x moe_ffn each) and the router [E, h]."""
    per_expert = (3 if gated else 2) * m.hidden_size * m.moe_ffn_hidden_size
    return m.num_experts * per_expert + m.num_experts * m.hidden_size


def _expert_params(m: ModelShape, gated: bool = True) -> int:
    """The routed experts alone: E x (2 or 3) x hidden x moe_ffn."""
    return m.num_experts * (3 if gated else 2) * m.hidden_size * m.moe_ffn_hidden_size


def _mlp_matmul_params(m: ModelShape) -> int:
    return m.num_experts * 3 * m.hidden_size * m.moe_ffn_hidden_size + m.num_experts * m.hidden_size


def _mlp_active_matmul_params(m: ModelShape) -> int:
    """The router and the token's top-k experts."""
    return m.moe_top_k * 3 * m.hidden_size * m.moe_ffn_hidden_size + m.num_experts * m.hidden_size


def _mlp_activation_bytes(m: ModelShape, gated: bool) -> float:
    """Per token, for each of its k experts: the fc1 output (2 f, twice gated) and the
    fc2 input (2 f), plus the permuted copy of its input (2 h); and the router's fp32
    logits and probabilities (2 x 4 E)."""
    f, h, k = m.moe_ffn_hidden_size, m.hidden_size, m.moe_top_k
    return k * (2 * f * (2 if gated else 1) + 2 * f + 2 * h) + 8 * m.num_experts


QWEN3_MOE = ModelFamily(
    model_type="qwen3_moe",
    architecture="Qwen3MoeForCausalLM",
    read_shape=read_shape,
    layer_spec=layer_spec,
    transformer_config=transformer_config,
    layer_rules=layer_rules,
    hf_tensor_shape=hf_tensor_shape,
    fp8_linear=re.compile(
        rf"^model\.layers\.\d+\.({ATTENTION_FP8}|mlp\.experts\.\d+\.(gate|up|down)_proj)\.weight$"
    ),
    counts=PlannerCounts(
        mlp_params=_mlp_params,
        mlp_matmul_params=_mlp_matmul_params,
        mlp_active_matmul_params=_mlp_active_matmul_params,
        mlp_activation_bytes=_mlp_activation_bytes,
        expert_params=_expert_params,
    ),
    inline_config={"hidden_act": "silu", "attention_bias": False},
    arch_fields=("num_experts", "num_experts_per_tok", "moe_intermediate_size", "norm_topk_prob"),
)
