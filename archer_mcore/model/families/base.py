"""What a model family is: the `ModelFamily` spec every family module fills in, and the
weight rule (`ParamRule`) its HF <-> megatron conversion is written in.

A family is one HF ``model_type``. Its spec says, in one place, how to read its HF
config into a `ModelShape`, which megatron-core layer spec and TransformerConfig fields
build it, how its HF tensors map onto megatron's parameters (per decoder layer; the
embedding, final norm and output layer are the same for every family,
`model/convert.py`), which of its HF tensors the rollout runs in FP8, and its
per-layer counts for the planner. Generic code (`model/build.py`, `model/convert.py`,
`model/weights.py`, `rollout/fp8_export.py`, `plan/formulas.py`) looks the spec up by
``model_type`` in the registry (`model/families/__init__.py`).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import KW_ONLY, dataclass, field
from typing import TYPE_CHECKING, Any, Literal

from archer_mcore.model.shape import ModelShape

if TYPE_CHECKING:
    from archer_mcore.config import ModelConfig, ParallelConfig
    from archer_mcore.model.fp8 import PrecisionChoices

Kind = Literal["replicated", "row", "col", "qkv", "gate_up", "vocab"]


@dataclass(frozen=True)
class ParamRule:
    """One megatron parameter and the HF tensors it is made of.

    kind: replicated (copied to every TP rank); row (split dim 0); col (split dim 1);
    qkv (q/k/v interleaved per query group, split by groups); gate_up (gate/up fused per
    rank); vocab (zero-padded rows, split dim 0).
    expert: for a routed expert's weight, its global expert index (the megatron name
    then holds the EP rank's local index, `model/convert.py`); None otherwise.
    """

    mcore: str
    hf: tuple[str, ...]
    kind: Kind
    _: KW_ONLY
    expert: int | None = None


@dataclass(frozen=True, kw_only=True)
class PlannerCounts:
    """A family's per-decoder-layer figures for the planner (`plan/formulas.py`); the
    attention, norms, embedding and LM head are counted there, the same for all.

    mlp_params(m, gated): parameters of one layer's MLP block (all experts and the
      router for MoE); gated = SwiGLU (3 matrices) else 2.
    mlp_matmul_params(m): weights of one layer's MLP matmuls (what the rollout holds).
    mlp_active_matmul_params(m): weights one token multiplies through in one layer's MLP
      (dense: all of them; MoE: its top-k experts and the router), for FLOPs.
    mlp_activation_bytes(m, gated): bytes one token leaves saved for backward in one
      layer's MLP (16-bit), the part split over TP (Korthikanti et al., table 2).
    expert_params(m, gated): the part of `mlp_params` in routed experts, which megatron
      splits over EP x expert-TP ranks and whose optimizer states the distributed
      optimizer shards over the expert data-parallel group (0 for a dense family).
    """

    mlp_params: Callable[[ModelShape, bool], int]
    mlp_matmul_params: Callable[[ModelShape], int]
    mlp_active_matmul_params: Callable[[ModelShape], int]
    mlp_activation_bytes: Callable[[ModelShape, bool], float]
    expert_params: Callable[[ModelShape, bool], int] = lambda m, gated: 0


@dataclass(frozen=True, kw_only=True)
class ModelFamily:
    """Everything the trainer knows about one HF ``model_type`` (torchtitan's TrainSpec
    pattern: a frozen record of functions).

    model_type: HF config.json ``model_type``, the registry key.
    architecture: HF ``architectures[0]`` (written for an inline `model.arch`).
    read_shape(cfg): HF config.json mapping -> `ModelShape`; ValueError naming the key
      for options the trainer does not support.
    inline_config: config.json keys the family implies for an inline `model.arch`
      (hidden_act, attention_bias, ...), written after the arch fields.
    arch_fields: the `model.arch` fields only this family writes to its config.json
      (the MoE ones for Qwen3-MoE); every other family leaves them out.
    transformer_config(shape, model, parallel): the family's megatron
      TransformerConfig fields (q/k/v bias, q/k norm, MoE router and experts).
    layer_spec(precision, shape): megatron-core ModuleSpec of one decoder layer.
    layer_rules(shape, te_names): HF <-> megatron rules of one decoder layer, names
      relative to ``decoder.layers.{j}.`` / ``model.layers.{i}.``, in HF order.
      te_names: Transformer Engine's names (norms fused into the next linear).
    hf_tensor_shape(name, shape): the shape of an HF tensor of this family, by name.
    fp8_linear: the HF tensor names the rollout runs in FP8 (SGLang's fp8 loader).
    counts: the planner's per-layer figures.
    """

    model_type: str
    architecture: str
    read_shape: Callable[[Mapping[str, Any]], ModelShape]
    layer_spec: Callable[[PrecisionChoices, ModelShape], Any]
    transformer_config: Callable[[ModelShape, ModelConfig, ParallelConfig], dict[str, Any]]
    layer_rules: Callable[[ModelShape, bool], list[ParamRule]]
    hf_tensor_shape: Callable[[str, ModelShape], tuple[int, ...]]
    fp8_linear: re.Pattern[str]
    counts: PlannerCounts
    inline_config: Mapping[str, Any] = field(default_factory=dict)
    arch_fields: tuple[str, ...] = ()
