"""The shape of a decoder as the trainer works from it: `ModelShape`, plain data read
from an HF ``config.json`` by the model family's reader (`model/families/`), with the
rope settings resolved as transformers resolves them (`rope_from_hf`).

`ModelShape` is the one description every other module (model builder, weight
converter, policy, planner) works from; it is independent of megatron.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

SUPPORTED_ROPE_TYPES = ("default", "yarn")


def yarn_default_attention_factor(factor: float) -> float:
    """YaRN's cos/sin multiplier when a config gives none: 0.1 ln(factor) + 1 (1 when
    factor <= 1), the paper's suggestion as transformers'
    `modeling_rope_utils._compute_yarn_parameters` (5.x) applies it."""
    return 1.0 if factor <= 1 else 0.1 * math.log(factor) + 1.0


@dataclass(frozen=True, kw_only=True)
class RopeScaling:
    """YaRN rope scaling (arXiv 2309.00071) with every value resolved as transformers
    resolves a Qwen3 config's ``rope_scaling`` / ``rope_parameters`` entry.

    factor: context extension factor s (>= 1); frequencies of the dimensions that turn
      fewer than `beta_slow` times over `original_max_position_embeddings` positions are
      divided by s, those that turn more than `beta_fast` times are kept, a linear ramp
      in between (`truncate`: the ramp bounds rounded outwards to whole dimensions).
    attention_factor: the multiplier of cos and sin (so of q and k), resolved.
    """

    rope_type: str
    factor: float
    original_max_position_embeddings: int
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    attention_factor: float = 1.0
    truncate: bool = True

    @property
    def extended_positions(self) -> int:
        """Positions the scaled RoPE is meant to cover: factor x the original limit."""
        return int(self.factor * self.original_max_position_embeddings)

    def to_hf(self) -> dict[str, Any]:
        """The HF ``rope_scaling`` entry (without rope_theta); `attention_factor` and
        `truncate` only where they differ from transformers' defaults."""
        out: dict[str, Any] = {
            "rope_type": self.rope_type,
            "factor": self.factor,
            "original_max_position_embeddings": self.original_max_position_embeddings,
            "beta_fast": self.beta_fast,
            "beta_slow": self.beta_slow,
        }
        if abs(self.attention_factor - yarn_default_attention_factor(self.factor)) > 1e-12:
            out["attention_factor"] = self.attention_factor
        if not self.truncate:
            out["truncate"] = False
        return out


@dataclass(frozen=True, kw_only=True)
class ModelShape:
    """Architecture of a decoder (the families of `model/families/`).

    qkv_bias: Qwen2 has biases on q/k/v projections; Qwen3 does not.
    qk_norm: Qwen3 applies a per-head RMSNorm (weight [head_dim]) to q and k.
    num_experts > 0 (Qwen3-MoE): every layer's MLP is `num_experts` routed SwiGLU
    experts of intermediate size `moe_ffn_hidden_size`, each token taking the
    `moe_top_k` of highest router softmax probability, weighted by those
    probabilities (renormalised to sum 1 when `norm_topk_prob`).
    """

    model_type: str
    vocab_size: int
    hidden_size: int
    ffn_hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rope_theta: float
    rms_eps: float
    tie_embeddings: bool
    qkv_bias: bool
    qk_norm: bool
    max_position_embeddings: int
    initializer_range: float = 0.02
    rope_scaling: RopeScaling | None = None  # None: plain RoPE
    num_experts: int = 0  # routed experts per layer; 0: dense MLP
    moe_ffn_hidden_size: int = 0  # one expert's intermediate size
    moe_top_k: int = 0  # experts per token
    norm_topk_prob: bool = False  # renormalise the top-k router probabilities to sum 1

    def __post_init__(self) -> None:
        if isinstance(self.rope_scaling, Mapping):  # from to_dict() / JSON
            object.__setattr__(self, "rope_scaling", RopeScaling(**self.rope_scaling))

    @property
    def is_moe(self) -> bool:
        return self.num_experts > 0

    @property
    def heads_per_group(self) -> int:
        return self.num_heads // self.num_kv_heads

    @property
    def position_limit(self) -> int:
        """The longest sequence (prompt + response, tokens) the model's positions cover:
        max_position_embeddings, or with YaRN the larger of it and factor x
        original_max_position_embeddings."""
        if self.rope_scaling is None:
            return self.max_position_embeddings
        return max(self.max_position_embeddings, self.rope_scaling.extended_positions)

    @property
    def position_limit_key(self) -> str:
        """The config.json key(s) `position_limit` comes from, for error messages."""
        if self.rope_scaling is None or self.position_limit == self.max_position_embeddings:
            return "max_position_embeddings"
        return "rope_scaling.factor x rope_scaling.original_max_position_embeddings"

    def hf_rope_entries(self) -> dict[str, Any]:
        """The config.json keys that describe the positions: rope_theta and, with
        scaling, ``rope_scaling`` (the key transformers 4.x and SGLang read; transformers
        5.x folds it into ``rope_parameters``)."""
        out: dict[str, Any] = {"rope_theta": self.rope_theta}
        if self.rope_scaling is not None:
            out["rope_scaling"] = self.rope_scaling.to_hf()
        return out

    def padded_vocab_size(self, tp: int, divisible_by: int = 128) -> int:
        """Rows of the padded embedding/output layer: vocab_size rounded up to a multiple
        of lcm(divisible_by, tp). For TP dividing `divisible_by` (1, 2, 4, ..., 128) this
        does not depend on TP, so a checkpoint's tensors keep their shape when it is
        resumed at another TP. (Megatron-LM's training scripts pad to a multiple of
        divisible_by * tp instead; megatron-core itself takes whatever size it is given.)"""
        m = math.lcm(divisible_by, tp)
        return ((self.vocab_size + m - 1) // m) * m

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def rope_from_hf(cfg: Mapping[str, Any]) -> tuple[float, RopeScaling | None]:
    """(rope_theta, scaling) from ``rope_parameters`` (transformers 5.x) or the legacy
    ``rope_scaling`` (+ top-level ``rope_theta``), resolved with transformers' rules
    (`PreTrainedConfig.standardize_rope_params` and `_compute_yarn_parameters`, 5.x): a
    top-level original_max_position_embeddings wins over the entry's, else the entry's,
    else max_position_embeddings; a missing factor is max_position_embeddings / original;
    a missing attention_factor is mscale(factor, mscale) / mscale(factor, mscale_all_dim)
    when both are given and non-zero, else 0.1 ln(factor) + 1.
    """
    rope = cfg.get("rope_parameters") or cfg.get("rope_scaling") or {}
    if not isinstance(rope, Mapping):
        raise ValueError(f"rope_scaling must be a mapping, got {rope!r}")
    theta = float(rope.get("rope_theta", cfg.get("rope_theta", 10000.0)))
    rtype = rope.get("rope_type", rope.get("type", "default")) or "default"
    if rtype not in SUPPORTED_ROPE_TYPES:
        raise ValueError(
            f"rope_scaling type {rtype!r} is not supported; use one of {SUPPORTED_ROPE_TYPES}"
        )
    partial = rope.get("partial_rotary_factor", cfg.get("partial_rotary_factor", 1.0))
    if partial not in (None, 1, 1.0):
        raise ValueError(f"partial_rotary_factor {partial!r} is not supported (only 1.0)")
    if rtype == "default":
        return theta, None
    max_pos = int(cfg.get("max_position_embeddings", 32768))
    top = cfg.get("original_max_position_embeddings")
    orig = int(top if top is not None else rope.get("original_max_position_embeddings", max_pos))
    factor = rope.get("factor")
    factor = max_pos / orig if factor is None else float(factor)
    if factor < 1.0:
        raise ValueError(f"rope_scaling.factor {factor!r} must be >= 1 for yarn")
    af = rope.get("attention_factor")
    if af is None:
        ms, ms_all = rope.get("mscale"), rope.get("mscale_all_dim")

        def mscale(scale: float, m: float) -> float:
            return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

        if ms and ms_all:
            af = mscale(factor, float(ms)) / mscale(factor, float(ms_all))
        else:
            af = yarn_default_attention_factor(factor)
    af = float(af)
    if factor <= 1.0 and af != 1.0:
        raise ValueError(
            f"rope_scaling.attention_factor {af!r} with factor {factor!r}: megatron's YaRN "
            "applies no attention factor when factor <= 1"
        )
    return theta, RopeScaling(
        rope_type="yarn",
        factor=factor,
        original_max_position_embeddings=orig,
        beta_fast=float(rope.get("beta_fast") or 32.0),
        beta_slow=float(rope.get("beta_slow") or 1.0),
        attention_factor=af,
        truncate=bool(rope.get("truncate", True)),
    )
