"""The shape of a Qwen2/Qwen3 model read from a Hugging Face ``config.json``.

`ModelShape` is the one description every other module (model builder, weight
converter, policy) works from; it is plain data, independent of megatron.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

SUPPORTED_MODEL_TYPES = ("qwen2", "qwen3")


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

    @property
    def heads_per_group(self) -> int:
        return self.num_heads // self.num_kv_heads

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


def _rope_theta(cfg: Mapping[str, Any]) -> float:
    rope = cfg.get("rope_parameters") or cfg.get("rope_scaling") or {}
    if isinstance(rope, Mapping):
        rtype = rope.get("rope_type", rope.get("type", "default"))
        if rtype not in (None, "default"):
            raise ValueError(f"rope_type {rtype!r} is not supported (only 'default' RoPE)")
        if "rope_theta" in rope:
            return float(rope["rope_theta"])
    return float(cfg.get("rope_theta", 10000.0))


def shape_from_hf_config(cfg: Mapping[str, Any] | str | Path) -> ModelShape:
    """Read a config dict, a config.json path or a model directory.

    Raises ValueError naming the key for unsupported architectures/options.
    """
    if not isinstance(cfg, Mapping):
        p = Path(cfg)
        if p.is_dir():
            p = p / "config.json"
        if not p.is_file():
            raise FileNotFoundError(f"HF config not found: {p}")
        cfg = json.loads(p.read_text())
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
    return ModelShape(
        model_type=model_type,
        vocab_size=int(cfg["vocab_size"]),
        hidden_size=hidden,
        ffn_hidden_size=int(cfg["intermediate_size"]),
        num_layers=int(cfg["num_hidden_layers"]),
        num_heads=heads,
        num_kv_heads=kv,
        head_dim=head_dim,
        rope_theta=_rope_theta(cfg),
        rms_eps=float(cfg.get("rms_norm_eps", 1e-6)),
        tie_embeddings=bool(cfg.get("tie_word_embeddings", False)),
        qkv_bias=model_type == "qwen2",
        qk_norm=model_type == "qwen3",
        max_position_embeddings=int(cfg.get("max_position_embeddings", 32768)),
        initializer_range=float(cfg.get("initializer_range", 0.02)),
    )
