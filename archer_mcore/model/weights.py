"""Move weights between HF checkpoints and a live (TP/PP/EP-sharded) megatron GPTModel.

`load_hf_weights` fills this rank's shard from an HF checkpoint; `iter_hf_tensors` /
`iter_hf_buckets` stream the whole model back out under HF names. The export is a
collective over the TP, PP and (MoE) EP groups: every rank of a model replica must
iterate it in step, and every one of them yields the same full tensors.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator

import torch
import torch.distributed as dist
from torch import Tensor, nn

from archer_mcore.model.convert import (
    ParamRule,
    expert_rank,
    from_tp_shards,
    hf_names,
    hf_to_mcore_shard,
    mcore_name,
    stage_layers,
    stage_rules,
)
from archer_mcore.model.families import family_of
from archer_mcore.model.fp8 import dequantized, load_param_
from archer_mcore.model.hf_config import ModelShape

NamedTensors = list[tuple[str, Tensor]]


def unwrap(model: nn.Module) -> nn.Module:
    """The GPTModel inside DDP / Float16Module wrappers."""
    while hasattr(model, "module"):
        model = model.module
    return model


def uses_te_names(model: nn.Module) -> bool:
    return any(k.endswith("layer_norm_weight") for k in unwrap(model).state_dict())


def _parallel_info() -> tuple[int, int, int, int]:
    from megatron.core import parallel_state as ps

    return (
        ps.get_tensor_model_parallel_world_size(),
        ps.get_pipeline_model_parallel_world_size(),
        ps.get_tensor_model_parallel_rank(),
        ps.get_pipeline_model_parallel_rank(),
    )


def _expert_info() -> tuple[int, int]:
    """(EP size, this rank's EP rank)."""
    from megatron.core import parallel_state as ps

    return ps.get_expert_model_parallel_world_size(), ps.get_expert_model_parallel_rank()


def _check_layer_numbers(model: nn.Module, shape: ModelShape, pp: int, pp_rank: int) -> None:
    expected = list(stage_layers(shape, pp, pp_rank))
    got = [layer.layer_number - 1 for layer in model.decoder.layers]
    if got != expected:
        raise RuntimeError(f"stage {pp_rank} holds layers {got}, the converter expects {expected}")


@torch.no_grad()
def load_hf_weights(model: nn.Module, get_hf: Callable[[str], Tensor], shape: ModelShape) -> None:
    """Copy HF tensors (fetched by name with `get_hf`) into this rank's model shard.

    Raises KeyError naming a missing HF tensor, ValueError on a shape mismatch or on a
    model parameter the converter does not know. Transformer Engine FP8 parameters are
    re-quantized in place by TE (`model.fp8.load_param_`).
    """
    m = unwrap(model)
    tp, pp, tp_rank, pp_rank = _parallel_info()
    ep, ep_rank = _expert_info()
    _check_layer_numbers(m, shape, pp, pp_rank)
    sd = hf_to_mcore_shard(
        get_hf,
        shape,
        tp=tp,
        pp=pp,
        tp_rank=tp_rank,
        pp_rank=pp_rank,
        padded_vocab=m.vocab_size,
        te_names=uses_te_names(m),
        ep=ep,
        ep_rank=ep_rank,
    )
    own = {k: v for k, v in m.state_dict(keep_vars=True).items() if not k.endswith("_extra_state")}
    unknown = sorted(set(own) - set(sd))
    if unknown:
        raise ValueError(f"model parameters the HF converter does not fill: {unknown}")
    for k, v in sd.items():
        if k not in own:
            # pp == 1 with tied embeddings: output_layer reuses the embedding weight.
            continue
        if own[k].shape != v.shape:
            raise ValueError(
                f"{k}: model shard {tuple(own[k].shape)} vs converted {tuple(v.shape)}"
            )
        load_param_(own[k], v)  # TE FP8 parameters: quantized by TE


def hf_tensor_shape(name: str, shape: ModelShape) -> tuple[int, ...]:
    """Shape of an HF tensor of the shape's family, from its name."""
    return family_of(shape.model_type).hf_tensor_shape(name, shape)


def _gather_tp(t: Tensor, rule: ParamRule, tp: int) -> list[Tensor]:
    """The TP shards of a rule's parameter (routed experts: over the expert-TP group,
    of the same size as TP)."""
    from megatron.core import parallel_state as ps

    if tp == 1 or rule.kind == "replicated":
        return [t]
    group = (
        ps.get_tensor_model_parallel_group()
        if rule.expert is None
        else ps.get_expert_tensor_parallel_group()
    )
    parts = [torch.empty_like(t) for _ in range(tp)]
    dist.all_gather(parts, t.contiguous(), group=group)
    return parts


@torch.no_grad()
def iter_hf_tensors(
    model: nn.Module, shape: ModelShape, dtype: torch.dtype | None = None
) -> Iterator[tuple[str, Tensor]]:
    """Yield (hf_name, full tensor) for every HF parameter, in HF order (collective).

    Tied models yield no ``lm_head.weight``. Tensors are detached copies in `dtype`
    (default: the model's parameter dtype). Transformer Engine FP8 parameters (model.fp8
    with the distributed optimizer) are dequantized to that dtype before the TP gather
    (`model.fp8.dequantized`).
    """
    from megatron.core import parallel_state as ps

    m = unwrap(model)
    tp, pp, _, pp_rank = _parallel_info()
    ep, ep_rank = _expert_info()
    te = uses_te_names(m)
    own = m.state_dict(keep_vars=True)
    device = next(m.parameters()).device
    param_dtype = next(m.parameters()).dtype
    out_dtype = dtype or param_dtype
    for stage in range(pp):
        for rule, prefix, layer in stage_rules(shape, pp, stage, te):
            if rule.mcore == "output_layer.weight" and shape.tie_embeddings:
                continue
            names = hf_names(rule, layer)
            owner = expert_rank(rule, shape, ep)  # None: every EP rank holds it
            if stage == pp_rank and owner in (None, ep_rank):
                # a TE FP8 parameter has no storage to gather: dequantize it first
                param = own[mcore_name(rule, prefix, shape, ep)].detach()
                local = dequantized(param, out_dtype)
                tensors = from_tp_shards(rule, _gather_tp(local, rule, tp), shape)
                tensors = [t.to(out_dtype).contiguous() for t in tensors]
            else:
                tensors = [
                    torch.empty(hf_tensor_shape(n, shape), dtype=out_dtype, device=device)
                    for n in names
                ]
            if owner is not None and ep > 1 and stage == pp_rank:
                group = ps.get_expert_model_parallel_group()
                for t in tensors:
                    dist.broadcast(t, group=group, group_src=owner)
            if pp > 1:
                group = ps.get_pipeline_model_parallel_group()
                for t in tensors:
                    dist.broadcast(t, group=group, group_src=stage)
            yield from zip(names, tensors)


def bucketize(named: Iterable[tuple[str, Tensor]], bucket_bytes: int) -> Iterator[NamedTensors]:
    """Group a stream of named tensors into lists of at most `bucket_bytes` bytes (a
    tensor larger than that travels alone)."""
    if bucket_bytes <= 0:
        raise ValueError(f"bucket_bytes must be > 0, got {bucket_bytes}")
    bucket: NamedTensors = []
    size = 0
    for name, t in named:
        nbytes = t.numel() * t.element_size()
        if bucket and size + nbytes > bucket_bytes:
            yield bucket
            bucket, size = [], 0
        bucket.append((name, t))
        size += nbytes
    if bucket:
        yield bucket


def iter_hf_buckets(
    model: nn.Module,
    shape: ModelShape,
    bucket_bytes: int = 512 * 1024**2,
    dtype: torch.dtype | None = None,
) -> Iterator[NamedTensors]:
    """`iter_hf_tensors` in buckets of about `bucket_bytes` (for rollout weight sync)."""
    return bucketize(iter_hf_tensors(model, shape, dtype), bucket_bytes)
