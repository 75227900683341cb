"""HF <-> megatron-core weight conversion, TP and PP aware; each family's decoder-layer
rules are in its module (`model/families/`), the embedding / final norm / output layer
rules and the tensor math here.

Pure functions over name -> tensor mappings; no process groups here (the live-model
export in `export.py` gathers shards and calls these).

megatron layout (per TP rank r of tp, per PP stage holding global layers
[s * L/pp, (s+1) * L/pp), renumbered from 0 locally, per EP rank holding routed experts
[q * E/ep, (q+1) * E/ep), renumbered from 0 locally):

- ``linear_qkv`` [ng/tp * (q_per_group + 2) * head_dim, hidden]: for each local query
  group g, its q heads, then its k head, then its v head (bias likewise, Qwen2).
- ``linear_fc1`` [2 * ffn/tp, hidden]: rank r's slice of gate_proj, then of up_proj.
- ``linear_proj`` / ``linear_fc2``: HF o_proj / down_proj split along dim 1.
- embedding / output layer: vocab rows zero-padded to `padded_vocab`, split along dim 0.
- norms: replicated. With the TE spec the pre-attention / pre-MLP norms are fused into
  ``linear_qkv.layer_norm_weight`` / ``linear_fc1.layer_norm_weight``.

Positions: `mcore_rope` / `hf_rope_from_mcore` map HF rope settings (plain RoPE or
YaRN) to megatron's GPTModel arguments and config attributes and back.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor

from archer_mcore.model.families import ParamRule, family_of
from archer_mcore.model.shape import ModelShape, RopeScaling


def layer_rules(shape: ModelShape, te_names: bool = False) -> list[ParamRule]:
    """Rules for one decoder layer, names relative to the layer prefix
    (``decoder.layers.{j}.`` / ``model.layers.{i}.``), in HF parameter order: the
    family's (`ModelFamily.layer_rules`)."""
    return family_of(shape.model_type).layer_rules(shape, te_names)


def embedding_rule() -> ParamRule:
    return ParamRule("embedding.word_embeddings.weight", ("model.embed_tokens.weight",), "vocab")


def final_norm_rule() -> ParamRule:
    return ParamRule("decoder.final_layernorm.weight", ("model.norm.weight",), "replicated")


def output_rule(shape: ModelShape) -> ParamRule:
    """The last stage's output layer. Tied models keep a copy of the embedding there when
    pp > 1 (megatron keeps the two in sync), and have none at pp == 1."""
    src = "model.embed_tokens.weight" if shape.tie_embeddings else "lm_head.weight"
    return ParamRule("output_layer.weight", (src,), "vocab")


def stage_layers(shape: ModelShape, pp: int, stage: int) -> range:
    """Global indices of the layers on pipeline stage `stage` (uniform split)."""
    if shape.num_layers % pp != 0:
        raise ValueError(f"num_hidden_layers {shape.num_layers} is not divisible by pp={pp}")
    per = shape.num_layers // pp
    return range(stage * per, (stage + 1) * per)


def stage_rules(
    shape: ModelShape, pp: int, stage: int, te_names: bool = False
) -> Iterator[tuple[ParamRule, str, int | None]]:
    """(rule, mcore prefix, global layer or None) for every parameter of a stage, in HF
    order. The HF names of layer rules get prefix ``model.layers.{global}.``."""
    if stage == 0:
        yield embedding_rule(), "", None
    for local, glob in enumerate(stage_layers(shape, pp, stage)):
        for rule in layer_rules(shape, te_names):
            yield rule, f"decoder.layers.{local}.", glob
    if stage == pp - 1:
        yield final_norm_rule(), "", None
        if not shape.tie_embeddings or pp > 1:
            yield output_rule(shape), "", None


def hf_names(rule: ParamRule, layer: int | None) -> tuple[str, ...]:
    return rule.hf if layer is None else tuple(f"model.layers.{layer}.{n}" for n in rule.hf)


# ------------------------------------------------------------------ tensor math
def fuse_qkv(q: Tensor, k: Tensor, v: Tensor, shape: ModelShape) -> Tensor:
    """HF q [nh*hd, ...], k/v [ng*hd, ...] -> megatron fused [ng*(q_per_g+2)*hd, ...]."""
    ng, qpg, hd = shape.num_kv_heads, shape.heads_per_group, shape.head_dim
    rest = q.shape[1:]
    qg = q.reshape(ng, qpg * hd, *rest)
    kg = k.reshape(ng, hd, *rest)
    vg = v.reshape(ng, hd, *rest)
    return torch.cat([qg, kg, vg], dim=1).reshape(ng * (qpg + 2) * hd, *rest)


def split_qkv(qkv: Tensor, shape: ModelShape) -> tuple[Tensor, Tensor, Tensor]:
    """Inverse of `fuse_qkv` on the full (all TP ranks concatenated) tensor."""
    ng, qpg, hd = shape.num_kv_heads, shape.heads_per_group, shape.head_dim
    rest = qkv.shape[1:]
    g = qkv.reshape(ng, (qpg + 2) * hd, *rest)
    q, k, v = torch.split(g, [qpg * hd, hd, hd], dim=1)
    fresh = torch.contiguous_format  # clone, never a view of the (model's) input
    return (
        q.reshape(ng * qpg * hd, *rest).clone(memory_format=fresh),
        k.reshape(ng * hd, *rest).clone(memory_format=fresh),
        v.reshape(ng * hd, *rest).clone(memory_format=fresh),
    )


def pad_vocab(w: Tensor, padded_vocab: int) -> Tensor:
    if w.shape[0] > padded_vocab:
        raise ValueError(f"vocab rows {w.shape[0]} exceed the padded vocab {padded_vocab}")
    if w.shape[0] == padded_vocab:
        return w
    return torch.cat([w, w.new_zeros(padded_vocab - w.shape[0], *w.shape[1:])], dim=0)


def to_tp_shards(
    rule: ParamRule, hf: list[Tensor], shape: ModelShape, tp: int, padded_vocab: int
) -> list[Tensor]:
    """HF tensors of one rule -> the `tp` megatron shards (contiguous clones)."""
    if rule.kind == "replicated":
        return [hf[0].clone() for _ in range(tp)]
    if rule.kind == "row":
        return [c.clone() for c in hf[0].chunk(tp, dim=0)]
    if rule.kind == "col":
        return [c.contiguous().clone() for c in hf[0].chunk(tp, dim=1)]
    if rule.kind == "vocab":
        return [c.clone() for c in pad_vocab(hf[0], padded_vocab).chunk(tp, dim=0)]
    if rule.kind == "qkv":
        if shape.num_kv_heads % tp != 0:
            raise ValueError(
                f"num_key_value_heads {shape.num_kv_heads} is not divisible by tp={tp}"
            )
        return [c.clone() for c in fuse_qkv(*hf, shape).chunk(tp, dim=0)]
    if rule.kind == "gate_up":
        gate, up = hf
        return [torch.cat([g, u], dim=0) for g, u in zip(gate.chunk(tp, 0), up.chunk(tp, 0))]
    raise ValueError(f"unknown rule kind {rule.kind!r}")


def _cat(shards: list[Tensor], dim: int) -> Tensor:
    """A fresh tensor (never a view of a model parameter): torch.cat copies; one shard
    is cloned."""
    return shards[0].clone() if len(shards) == 1 else torch.cat(shards, dim=dim)


def from_tp_shards(rule: ParamRule, shards: list[Tensor], shape: ModelShape) -> list[Tensor]:
    """The `tp` megatron shards of one rule -> its HF tensors (in `rule.hf` order); each
    result is a fresh tensor, copied once."""
    if rule.kind == "replicated":
        return [shards[0].clone()]
    if rule.kind == "row":
        return [_cat(shards, 0)]
    if rule.kind == "col":
        return [_cat(shards, 1)]
    if rule.kind == "vocab":
        if len(shards) == 1:
            return [shards[0][: shape.vocab_size].clone()]
        return [torch.cat(shards, dim=0)[: shape.vocab_size]]
    if rule.kind == "qkv":
        full = shards[0] if len(shards) == 1 else torch.cat(shards, dim=0)
        return list(split_qkv(full, shape))
    if rule.kind == "gate_up":
        halves = [s.chunk(2, dim=0) for s in shards]
        return [torch.cat([h[0] for h in halves], 0), torch.cat([h[1] for h in halves], 0)]
    raise ValueError(f"unknown rule kind {rule.kind!r}")


# ------------------------------------------------------------------ whole-model maps
def experts_per_rank(shape: ModelShape, ep: int) -> int:
    """Routed experts on one EP rank (E / EP); ValueError when EP does not divide E."""
    if shape.num_experts % ep != 0:
        raise ValueError(
            f"parallel.expert_model_parallel_size {ep} does not divide num_experts "
            f"{shape.num_experts}"
        )
    return shape.num_experts // ep


def expert_rank(rule: ParamRule, shape: ModelShape, ep: int) -> int | None:
    """The EP rank holding a routed expert's rule (experts [r E/EP, (r+1) E/EP) on rank
    r, megatron's layout); None for any other rule (held by every EP rank)."""
    if rule.expert is None:
        return None
    return rule.expert // experts_per_rank(shape, ep)


def mcore_name(rule: ParamRule, prefix: str, shape: ModelShape, ep: int) -> str:
    """The megatron state-dict name of a rule on its rank: a routed expert's weight
    carries its local index on its EP rank (global index mod E / EP)."""
    if rule.expert is None:
        return prefix + rule.mcore
    return prefix + rule.mcore.format(local=rule.expert % experts_per_rank(shape, ep))


def hf_to_mcore_shard(
    get_hf: Callable[[str], Tensor],
    shape: ModelShape,
    *,
    tp: int,
    pp: int,
    tp_rank: int,
    pp_rank: int,
    padded_vocab: int,
    te_names: bool = False,
    ep: int = 1,
    ep_rank: int = 0,
) -> dict[str, Tensor]:
    """The megatron state dict of one (tp_rank, pp_rank, ep_rank) model shard (MoE: the
    EP rank's experts only; expert TP = TP).

    `get_hf(name)` returns one HF tensor (lets the caller read lazily from safetensors);
    KeyError from it is re-raised naming the missing HF tensor.
    """
    out: dict[str, Tensor] = {}
    for rule, prefix, layer in stage_rules(shape, pp, pp_rank, te_names):
        owner = expert_rank(rule, shape, ep)
        if owner is not None and owner != ep_rank:
            continue
        names = hf_names(rule, layer)
        try:
            tensors = [get_hf(n) for n in names]
        except KeyError as e:
            raise KeyError(f"HF checkpoint is missing tensor {e.args[0]!r}") from None
        shards = to_tp_shards(rule, tensors, shape, tp, padded_vocab)
        out[mcore_name(rule, prefix, shape, ep)] = shards[tp_rank]
    return out


def mcore_shards_to_hf(
    shards: Mapping[tuple[int, ...], Mapping[str, Tensor]],
    shape: ModelShape,
    *,
    tp: int,
    pp: int,
    te_names: bool = False,
    ep: int = 1,
) -> dict[str, Tensor]:
    """Merge all megatron state dicts into one HF state dict: keys (tp_rank, pp_rank),
    or (tp_rank, pp_rank, ep_rank) when ep > 1.

    Tied models get no ``lm_head.weight`` (as transformers saves them)."""
    out: dict[str, Tensor] = {}
    for stage in range(pp):
        for rule, prefix, layer in stage_rules(shape, pp, stage, te_names):
            if rule.mcore == "output_layer.weight" and shape.tie_embeddings:
                continue
            key = mcore_name(rule, prefix, shape, ep)
            owner = expert_rank(rule, shape, ep) or 0
            try:
                parts = [
                    shards[(r, stage) if ep == 1 else (r, stage, owner)][key] for r in range(tp)
                ]
            except KeyError:
                where = f"pp={stage}" + (f", ep={owner}" if ep > 1 else "")
                raise KeyError(f"megatron shard ({where}) is missing {key!r}") from None
            for name, t in zip(hf_names(rule, layer), from_tp_shards(rule, parts, shape)):
                out[name] = t
    return out


# ------------------------------------------------------------------ positions (config)
@dataclass(frozen=True)
class MegatronRope:
    """How megatron-core 0.16.1 expresses a shape's rotary embedding.

    position_embedding_type: GPTModel's argument ("rope" or "yarn").
    rotary_base: GPTModel's ``rotary_base`` (HF rope_theta).
    config_attrs: attributes GPTModel (``megatron/core/models/gpt/gpt_model.py``) and
      the attention's ``_yarn_get_concentration_factor_from_config``
      (``megatron/core/models/common/embeddings/yarn_rotary_pos_embedding.py``) read
      off the TransformerConfig with getattr for "yarn"; empty for plain RoPE.
    """

    position_embedding_type: Literal["rope", "yarn"]
    rotary_base: float
    config_attrs: dict[str, float | int | bool]


def mcore_rope(shape: ModelShape) -> MegatronRope:
    """HF rope settings -> megatron's.

    megatron multiplies cos/sin by mscale(s, yarn_mscale) / mscale(s, yarn_mscale_all_dim)
    with mscale(s, m) = 0.1 m ln s + 1 (s > 1); with yarn_mscale_all_dim = 0 the
    denominator is 1, so yarn_mscale = (attention_factor - 1) / (0.1 ln s) reproduces any
    resolved HF attention factor. At s = 1 megatron's factor is 1 (the only value
    `shape_from_hf_config` accepts there), and yarn_mscale is left at 1.
    """
    rs = shape.rope_scaling
    if rs is None:
        return MegatronRope("rope", shape.rope_theta, {})
    mscale = (rs.attention_factor - 1.0) / (0.1 * math.log(rs.factor)) if rs.factor > 1 else 1.0
    return MegatronRope(
        "yarn",
        shape.rope_theta,
        {
            "yarn_rotary_scaling_factor": rs.factor,
            "yarn_original_max_position_embeddings": rs.original_max_position_embeddings,
            "yarn_beta_fast": rs.beta_fast,
            "yarn_beta_slow": rs.beta_slow,
            "yarn_mscale": mscale,
            "yarn_mscale_all_dim": 0.0,
            "yarn_correction_range_round_to_int": rs.truncate,
        },
    )


def hf_rope_from_mcore(rope: MegatronRope) -> dict[str, Any]:
    """megatron rope settings -> the config.json keys (rope_theta [+ rope_scaling]);
    the inverse of `mcore_rope` on the resolved values."""
    out: dict[str, Any] = {"rope_theta": float(rope.rotary_base)}
    if rope.position_embedding_type == "rope":
        return out
    a = rope.config_attrs
    s = float(a["yarn_rotary_scaling_factor"])

    def mscale(m: float) -> float:
        return 1.0 if s <= 1 else 0.1 * m * math.log(s) + 1.0

    out["rope_scaling"] = RopeScaling(
        rope_type="yarn",
        factor=s,
        original_max_position_embeddings=int(a["yarn_original_max_position_embeddings"]),
        beta_fast=float(a["yarn_beta_fast"]),
        beta_slow=float(a["yarn_beta_slow"]),
        attention_factor=mscale(float(a["yarn_mscale"])) / mscale(float(a["yarn_mscale_all_dim"])),
        truncate=bool(a["yarn_correction_range_round_to_int"]),
    ).to_hf()
    return out
