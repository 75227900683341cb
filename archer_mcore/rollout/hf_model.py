"""Build a transformers Qwen2/Qwen3 causal LM from an HF config and load named tensors
into it by HF parameter name (the receiving end of the bucketed weight sync)."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from transformers import AutoConfig, AutoModelForCausalLM, PretrainedConfig

from archer_mcore.model.hf_config import SUPPORTED_MODEL_TYPES, read_hf_config
from archer_mcore.rollout.types import NamedTensorBucket, RolloutError


def load_hf_config(config: PretrainedConfig | Mapping[str, Any] | str | Path) -> PretrainedConfig:
    """An HF config from a config object, a dict (must hold "model_type"), a config.json
    path or a model directory. Raises ValueError for a model type other than Qwen2/Qwen3."""
    if isinstance(config, PretrainedConfig):
        cfg = config
    else:
        d = read_hf_config(config)
        if "model_type" not in d:
            raise ValueError("HF config dict needs a 'model_type' key (qwen2 or qwen3)")
        cfg = AutoConfig.for_model(d.pop("model_type"), **d)
    if cfg.model_type not in SUPPORTED_MODEL_TYPES:
        raise ValueError(
            f"model_type {cfg.model_type!r} is not supported; expected one of {SUPPORTED_MODEL_TYPES}"
        )
    return cfg


def build_causal_lm(
    config: PretrainedConfig | Mapping[str, Any] | str | Path,
    state_dict: Mapping[str, Tensor] | None = None,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
) -> nn.Module:
    """A Qwen2/Qwen3 ForCausalLM in eval mode on CPU: random weights (seeded) or the given
    HF state_dict (strict: every parameter must be present)."""
    cfg = load_hf_config(config)
    cfg._attn_implementation = "sdpa"
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(cfg, dtype=dtype)
    model.eval()
    if state_dict is not None:
        load_named_tensors(model, [list(state_dict.items())], require_all=True)
    return model


def parameter_names(model: nn.Module) -> set[str]:
    """HF names a full weight update must cover (tied lm_head excluded when tied)."""
    names = set(model.state_dict().keys())
    if getattr(model.config, "tie_word_embeddings", False):
        names.discard("lm_head.weight")
    return names


@torch.no_grad()
def load_named_tensors(
    model: nn.Module, buckets: Iterable[NamedTensorBucket], require_all: bool = False
) -> set[str]:
    """Copy each (hf_name, tensor) into the model's tensor of that name (cast to its
    dtype). Returns the set of names loaded. Raises RolloutError naming an unknown
    name or a shape mismatch; with require_all, also names the parameters never sent."""
    targets = model.state_dict(keep_vars=True)
    loaded: set[str] = set()
    for bucket in buckets:
        for name, tensor in bucket:
            target = targets.get(name)
            if target is None:
                raise RolloutError(f"weight update: unknown HF parameter name {name!r}")
            if tuple(target.shape) != tuple(tensor.shape):
                raise RolloutError(
                    f"weight update: {name!r} has shape {tuple(tensor.shape)}, "
                    f"model expects {tuple(target.shape)}"
                )
            target.data.copy_(tensor.detach().to(device=target.device, dtype=target.dtype))
            loaded.add(name)
    if require_all:
        missing = sorted(parameter_names(model) - loaded)
        if missing:
            raise RolloutError(
                f"weight update left {len(missing)} parameters unset, e.g. {missing[:5]}"
            )
    return loaded
