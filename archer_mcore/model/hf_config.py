"""The shape of a Qwen2/Qwen3 model read from a Hugging Face ``config.json``.

`ModelShape` is the one description every other module (model builder, weight
converter, policy, planner) works from; it is plain data, independent of megatron.
`model_hf_config` is the one reader of a config's `model` section into that
``config.json`` form (model.path's file, or the inline `model.arch`).
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from archer_mcore.config import ConfigError, ModelConfig

SUPPORTED_MODEL_TYPES = ("qwen2", "qwen3")
SUPPORTED_ROPE_TYPES = ("default", "yarn")


def yarn_default_attention_factor(factor: float) -> float:
    """YaRN's cos/sin multiplier when a config gives none: 0.1 ln(factor) + 1 (1 when
    factor <= 1), the paper's suggestion as transformers'
    `modeling_rope_utils._compute_yarn_parameters` (5.x) applies it."""
    return 1.0 if factor <= 1 else 0.1 * math.log(factor) + 1.0


@dataclass(frozen=True)
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


@dataclass(frozen=True)
class ModelShape:
    """Architecture of a Qwen2/Qwen3 decoder.

    qkv_bias: Qwen2 has biases on q/k/v projections; Qwen3 does not.
    qk_norm: Qwen3 applies a per-head RMSNorm (weight [head_dim]) to q and k.
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

    def __post_init__(self) -> None:
        if isinstance(self.rope_scaling, Mapping):  # from to_dict() / JSON
            object.__setattr__(self, "rope_scaling", RopeScaling(**self.rope_scaling))

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


def _rope(cfg: Mapping[str, Any]) -> tuple[float, RopeScaling | None]:
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


def read_hf_config(cfg: Mapping[str, Any] | str | Path) -> dict[str, Any]:
    """An HF config as a dict (a copy): from a dict, a config.json path or a model
    directory. FileNotFoundError when there is no such config.json."""
    if isinstance(cfg, Mapping):
        return dict(cfg)
    p = Path(cfg)
    if p.is_dir():
        p = p / "config.json"
    if not p.is_file():
        raise FileNotFoundError(f"HF config not found: {p}")
    return json.loads(p.read_text())


def shape_from_hf_config(cfg: Mapping[str, Any] | str | Path) -> ModelShape:
    """Read a config dict, a config.json path or a model directory.

    Raises ValueError naming the key for unsupported architectures/options.
    """
    cfg = read_hf_config(cfg)
    model_type = cfg.get("model_type")
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ValueError(
            f"model_type {model_type!r} is not supported; expected one of {SUPPORTED_MODEL_TYPES}"
        )
    act = cfg.get("hidden_act", "silu")
    if act != "silu":
        raise ValueError(f"hidden_act {act!r} is not supported (SwiGLU needs 'silu')")
    if model_type == "qwen3" and cfg.get("attention_bias", False):
        raise ValueError("attention_bias=True is not supported for qwen3")
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
    theta, scaling = _rope(cfg)
    return ModelShape(
        model_type=model_type,
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
        qkv_bias=model_type == "qwen2",
        qk_norm=model_type == "qwen3",
        max_position_embeddings=int(cfg.get("max_position_embeddings", 32768)),
        initializer_range=float(cfg.get("initializer_range", 0.02)),
        rope_scaling=scaling,
    )


def model_hf_config(
    model: ModelConfig,
    search_dirs: Sequence[str | Path] = (),
    token_ids: Mapping[str, int | None] | None = None,
) -> dict[str, Any]:
    """The HF ``config.json`` mapping of a config's `model` section.

    With `model.path`: the ``config.json`` in that directory, tried as given, then
    under each of `search_dirs` in turn (the first found wins). Without: the inline
    `model.arch` written out as the builder's HF config (every `arch` field under its
    HF name, ``model_type`` = family, SwiGLU, q/k/v biases for Qwen2), with
    `token_ids` (pad/eos/bos token ids from the tokenizer) added before
    ``torch_dtype``; `token_ids` is not used with `model.path`.
    Raises ConfigError naming `model.path` when no ``config.json`` is found.
    """
    if model.path:
        candidates = [Path(model.path), *(Path(d) / model.path for d in search_dirs)]
        for cand in candidates:
            if (cand / "config.json").is_file():
                return read_hf_config(cand)
        if len(candidates) == 1:
            raise ConfigError(f"model.path: {candidates[0] / 'config.json'} does not exist")
        raise ConfigError(f"model.path = {model.path!r}: no config.json found there")
    a = model.arch
    d = {k: v for k, v in asdict(a).items() if k != "family"}
    d.update(
        model_type=a.family,
        architectures=["Qwen3ForCausalLM" if a.family == "qwen3" else "Qwen2ForCausalLM"],
        hidden_act="silu",
        attention_bias=a.family == "qwen2",
        **(token_ids or {}),
        torch_dtype="float32",
    )
    return d
