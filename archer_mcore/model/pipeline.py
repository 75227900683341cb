"""Run a GPTModel over micro-batches through megatron's forward_backward_func (so the
same code serves PP=1 and the 1F1B pipeline schedule).

A micro-batch is right-padded: ``input_ids`` [b, s] and ``position_ids`` [b, s]
(0..s-1), plus whatever tensors the last stage's `loss_fn` needs. Attention is causal,
so right padding never changes the outputs at valid positions. A packed micro-batch
is one row of several sequences with `cu_seqlens` (see `MicroBatch`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import KW_ONLY, dataclass, field
from functools import partial
from typing import Any

import torch
from torch import Tensor, nn

LossFn = Callable[[Tensor, "MicroBatch"], tuple[Tensor, dict[str, Any]]]


@dataclass
class MicroBatch:
    """input_ids/position_ids [b, s] long; `extras` are loss inputs (any shapes).

    A packed micro-batch (b = 1, several sequences back to back) also has
    `cu_seqlens` [segments + 1] int32 (segment boundaries, the last = s) and
    `max_seqlen` (the longest segment); the model then gets megatron's
    `PackedSeqParams(qkv_format="thd")`, which confines attention to each segment and
    restarts RoPE positions at each boundary."""

    input_ids: Tensor
    position_ids: Tensor
    extras: dict[str, Any] = field(default_factory=dict)
    _: KW_ONLY
    cu_seqlens: Tensor | None = None
    max_seqlen: int | None = None

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.input_ids.shape)  # type: ignore[return-value]


def causal_positions(input_ids: Tensor) -> Tensor:
    b, s = input_ids.shape
    return torch.arange(s, device=input_ids.device).unsqueeze(0).expand(b, s).contiguous()


def packed_params(mb: MicroBatch, device: torch.device) -> Any:
    """megatron-core's PackedSeqParams (THD) for a packed micro-batch."""
    from megatron.core.packed_seq_params import PackedSeqParams

    cu = mb.cu_seqlens.to(device=device, dtype=torch.int32)
    return PackedSeqParams(
        qkv_format="thd",
        cu_seqlens_q=cu,
        cu_seqlens_kv=cu,
        max_seqlen_q=mb.max_seqlen,
        max_seqlen_kv=mb.max_seqlen,
    )


def run_microbatches(
    model: nn.Module, microbatches: list[MicroBatch], loss_fn: LossFn, forward_only: bool
) -> list[dict[str, Any]]:
    """Forward (and backward unless `forward_only`) over all micro-batches.

    `loss_fn(logits_shard [b, s, V_pad/tp], mb) -> (loss, outputs)` runs on the last
    pipeline stage only; its loss is what gets back-propagated, unscaled: this
    function undoes megatron's division by the number of micro-batches, so the
    gradient is that of the *sum* of the micro-batch losses (before DDP's DP mean).
    Returns the `outputs` dicts, in micro-batch order, on the last stage ([] elsewhere).
    """
    from megatron.core.pipeline_parallel import get_forward_backward_func

    if not microbatches:
        return []
    n = len(microbatches)
    device = next(model.parameters()).device

    def loss_wrapper(mb: MicroBatch, output: Tensor) -> tuple[Tensor, dict[str, Any]]:
        loss, outputs = loss_fn(output, mb)
        return loss * n, outputs  # megatron divides by n

    def forward_step(data_iterator, chunk):
        mb = next(data_iterator)
        ids = mb.input_ids.to(device)
        pos = mb.position_ids.to(device)
        if mb.cu_seqlens is None:
            out = chunk(ids, pos, None)
        else:
            out = chunk(ids, pos, None, packed_seq_params=packed_params(mb, device))
        return out, partial(loss_wrapper, mb)

    fb = get_forward_backward_func()
    max_s = max(mb.shape[1] for mb in microbatches)
    max_b = max(mb.shape[0] for mb in microbatches)
    return fb(
        forward_step_func=forward_step,
        data_iterator=iter(microbatches),
        model=[model],
        num_microbatches=n,
        seq_length=max_s,
        micro_batch_size=max_b,
        forward_only=forward_only,
    )
