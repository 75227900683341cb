"""HF ``config.json`` in and out: `read_hf_config` (a dict, a file or a model
directory), `shape_from_hf_config` (its `ModelShape`, read by the model family's
reader, `model/families/`), and `model_hf_config`, the one reader of a config's `model`
section into that ``config.json`` form (model.path's file, or the inline `model.arch`).

`ModelShape` and the rope settings live in `model/shape.py` and are re-exported here.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

from archer_mcore.config import ConfigError, ModelConfig
from archer_mcore.model.families import FAMILIES, SUPPORTED_MODEL_TYPES, family_of
from archer_mcore.model.shape import (
    SUPPORTED_ROPE_TYPES,
    ModelShape,
    RopeScaling,
    rope_from_hf,
    yarn_default_attention_factor,
)

__all__ = [
    "SUPPORTED_MODEL_TYPES",
    "SUPPORTED_ROPE_TYPES",
    "ModelShape",
    "RopeScaling",
    "model_hf_config",
    "read_hf_config",
    "rope_from_hf",
    "shape_from_hf_config",
    "yarn_default_attention_factor",
]


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
    """Read a config dict, a config.json path or a model directory with its family's
    reader (`model/families/`).

    Raises ValueError naming the key for unsupported architectures/options.
    """
    cfg = read_hf_config(cfg)
    return family_of(cfg.get("model_type")).read_shape(cfg)


def model_hf_config(
    model: ModelConfig,
    search_dirs: Sequence[str | Path] = (),
    token_ids: Mapping[str, int | None] | None = None,
) -> dict[str, Any]:
    """The HF ``config.json`` mapping of a config's `model` section.

    With `model.path`: the ``config.json`` in that directory, tried as given, then
    under each of `search_dirs` in turn (the first found wins). Without: the inline
    `model.arch` written out as the builder's HF config (every `arch` field under its
    HF name but those only other families write, e.g. the MoE fields for a dense
    family; ``model_type`` = family, the family's `inline_config`: SwiGLU, q/k/v
    biases for Qwen2), with
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
    family = family_of(a.family)
    others = {k for f in FAMILIES.values() for k in f.arch_fields} - set(family.arch_fields)
    d = {k: v for k, v in asdict(a).items() if k != "family" and k not in others}
    d.update(
        model_type=a.family,
        architectures=[family.architecture],
        **family.inline_config,
        **(token_ids or {}),
        torch_dtype="float32",
    )
    return d
