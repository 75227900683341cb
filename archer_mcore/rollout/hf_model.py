"""Build a transformers causal LM of a registered family (Qwen2, Qwen3, Qwen3-MoE) from an
HF config and load named tensors into it by HF parameter name (the receiving end of the
bucketed weight sync).

Names are the checkpoint's (what `model/weights.py` exports and safetensors hold). For
a MoE model those are per expert, ``model.layers.{i}.mlp.experts.{e}.{gate,up,down}_proj
.weight`` ([f, h], [f, h], [h, f]), while transformers 5.25 holds each layer's experts
fused in memory (`Qwen3MoeExperts`): ``mlp.experts.gate_up_proj`` [E, 2f, h] (expert
e's gate rows [0, f), up rows [f, 2f)) and ``mlp.experts.down_proj`` [E, h, f]. A
per-expert tensor is copied into its slice of the fused one.
"""

from __future__ import annotations

import re
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
    path or a model directory. Raises ValueError for an unregistered model type
    (`model/families`)."""
    if isinstance(config, PretrainedConfig):
        cfg = config
    else:
        d = read_hf_config(config)
        if "model_type" not in d:
            raise ValueError(
                f"HF config dict needs a 'model_type' key (one of {SUPPORTED_MODEL_TYPES})"
            )
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
    """A ForCausalLM of a registered family in eval mode on CPU: random weights
    (seeded) or the given HF state_dict by checkpoint names (strict: every parameter
    must be present)."""
    cfg = load_hf_config(config)
    cfg._attn_implementation = "sdpa"
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(cfg, dtype=dtype)
    model.eval()
    if state_dict is not None:
        load_named_tensors(model, [list(state_dict.items())], require_all=True)
    return model


#: a routed expert's checkpoint name: (layer prefix ending in "mlp.experts", expert, proj)
_EXPERT_NAME = re.compile(r"^(.*\.mlp\.experts)\.(\d+)\.(gate|up|down)_proj\.weight$")
#: transformers' fused expert tensor: (layer prefix ending in "mlp.experts", which one)
_FUSED_NAME = re.compile(r"^(.*\.mlp\.experts)\.(gate_up_proj|down_proj)$")


def _expert_slot(targets: Mapping[str, Tensor], name: str) -> Tensor | None:
    """The view of transformers' fused expert tensor that a per-expert checkpoint
    name fills ([f, h] for gate/up, [h, f] for down), or None when `name` is not a
    routed expert's or the model has no fused experts there (or no expert e)."""
    m = _EXPERT_NAME.match(name)
    if m is None:
        return None
    prefix, e, proj = m.group(1), int(m.group(2)), m.group(3)
    fused = targets.get(f"{prefix}.{'down_proj' if proj == 'down' else 'gate_up_proj'}")
    if fused is None or fused.dim() != 3 or e >= fused.shape[0]:
        return None
    if proj == "down":
        return fused.data[e]
    f = fused.shape[1] // 2
    return fused.data[e, :f] if proj == "gate" else fused.data[e, f:]


def parameter_names(model: nn.Module) -> set[str]:
    """HF checkpoint names a full weight update must cover (tied lm_head excluded when
    tied; a fused expert tensor stands for its per-expert names)."""
    names: set[str] = set()
    for key, value in model.state_dict().items():
        m = _FUSED_NAME.match(key)
        if m is None:
            names.add(key)
            continue
        projs = ("down",) if m.group(2) == "down_proj" else ("gate", "up")
        names.update(
            f"{m.group(1)}.{e}.{p}_proj.weight" for e in range(value.shape[0]) for p in projs
        )
    if getattr(model.config, "tie_word_embeddings", False):
        names.discard("lm_head.weight")
    return names


@torch.no_grad()
def load_named_tensors(
    model: nn.Module, buckets: Iterable[NamedTensorBucket], require_all: bool = False
) -> set[str]:
    """Copy each (hf_name, tensor) into the model's tensor of that name (cast to its
    dtype), a routed expert's into its slice of the fused expert tensor. Returns the
    set of names loaded. Raises RolloutError naming an unknown name or a shape
    mismatch; with require_all, also names the parameters never sent."""
    targets = model.state_dict(keep_vars=True)
    loaded: set[str] = set()
    for bucket in buckets:
        for name, tensor in bucket:
            target = targets.get(name)
            if target is None:
                target = _expert_slot(targets, name)
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
