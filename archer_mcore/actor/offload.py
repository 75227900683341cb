"""Free the trainer's training-only device memory while colocated SGLang servers
generate, and bring it back before training (issue 21, item 3).

Colocated servers size their KV cache from the memory free when they start; the
trainer then grows (Adam moments appear at the first step, activations leave cached
blocks) and never gives memory back, so the servers' first
`/resume_memory_occupation` after training can run out of memory. `TrainerOffload`
moves what only the optimizer step needs off the device between steps:

- the optimizer state of megatron-core 0.16.1's optimizers (`DistributedOptimizer`,
  `Float16OptimizerWithFloat16Params`, a `ChainedOptimizer` of them): every tensor of
  the inner torch optimizer's `state` (Adam's `exp_avg` / `exp_avg_sq`, fp32, this
  rank's DP shard) and the fp32 main parameters kept for bf16/fp16 model parameters
  (`shard_fp32_from_float16_groups` / `fp32_from_float16_groups`). Each tensor is
  copied to a host buffer (pinned on CUDA, allocated once and reused every cycle)
  and its `.data` is pointed at that buffer, so the Python objects megatron and the
  inner optimizer hold (param groups, `state` keys, `model_param.main_param`) stay
  the same objects, and a checkpoint written while offloaded reads the host copies
  (megatron gathers optimizer state through `.cpu()` anyway). Main parameters that
  are views of model parameters (fp32 models: the optimizer steps the model's own
  storage) are not moved. Scalars (torch Adam's `step`) stay where they are;
- the DDP gradient buffers (`_ParamAndGradBuffer.grad_data`, fp32): their storage is
  resized to 0 bytes and back, so every view megatron keeps into it
  (`param.main_grad`, `bucket.grad_data`) stays valid. The gradients are dead between
  optimizer steps (`MegatronPolicy.train_step` zeroes the buffers before its
  backward), so by default they come back as zeros without a copy through the host
  (`copy_grads=True` copies them, for callers that need them back); the main
  parameters' `.grad` (views of or copies from those buffers, set by the last step)
  is dropped, as the next `optimizer.zero_grad()` would.

The bf16 model parameters stay: the weight export, checkpoints and held-out scoring
read them while the servers hold the devices. Memory figures on a GPU come from
`benchmarks/gpu_check.sh`.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch


def inner_optimizers(optimizer: Any) -> list[Any]:
    """The megatron optimizers inside `optimizer` (a `ChainedOptimizer`'s chain, else
    `optimizer` itself), without stub optimizers (ranks with no parameters)."""
    chain = getattr(optimizer, "chained_optimizers", None) or [optimizer]
    return [o for o in chain if not getattr(o, "is_stub_optimizer", False)]


def _main_params(opt: Any) -> Iterator[torch.Tensor]:
    """The fp32 main copies of a megatron optimizer's bf16/fp16 parameters (None entries,
    precision-aware optimizers, are skipped)."""
    groups = getattr(opt, "shard_fp32_from_float16_groups", None)
    if groups is None:
        groups = getattr(opt, "fp32_from_float16_groups", [])
    for group in groups:
        for p in group:
            if p is not None:
                yield p


def _storage_key(t: torch.Tensor) -> tuple[str, int]:
    return str(t.device), t.untyped_storage().data_ptr()


def optimizer_tensors(optimizer: Any, model_storages: set[tuple[str, int]]) -> list[torch.Tensor]:
    """Every tensor `TrainerOffload` moves for `optimizer`: main parameters (unless
    their storage is a model parameter's, `model_storages`) and non-scalar state
    tensors, each once, in a fixed order."""
    out: list[torch.Tensor] = []
    seen: set[int] = set()
    for opt in inner_optimizers(optimizer):
        for p in _main_params(opt):
            if id(p) not in seen and _storage_key(p) not in model_storages:
                seen.add(id(p))
                out.append(p)
        inner = opt.optimizer
        for group in inner.param_groups:
            for p in group["params"]:
                for value in inner.state.get(p, {}).values():
                    if (
                        isinstance(value, torch.Tensor)
                        and value.dim() > 0
                        and id(value) not in seen
                    ):
                        seen.add(id(value))
                        out.append(value)
    return out


def grad_buffers(model: Any) -> list[Any]:
    """The megatron DDP `_ParamAndGradBuffer`s of `model` (a DDP module or a list of
    model chunks). A buffer whose gradient storage doubles as the parameter buffer
    (MXFP8 `shared_buffer`) is left out: freeing it would free the parameters."""
    chunks = model if isinstance(model, Sequence) else [model]
    out = []
    for chunk in chunks:
        for buf in [*getattr(chunk, "buffers", []), *getattr(chunk, "expert_parallel_buffers", [])]:
            if getattr(buf, "shared_buffer", None) is None and buf.grad_data is not None:
                out.append(buf)
    return out


@dataclass
class OffloadCounts:
    """What the last `offload()` freed on the device, bytes."""

    optimizer_bytes: int = 0  # optimizer state + fp32 main params moved to host
    grad_bytes: int = 0  # gradient-buffer storage released


@dataclass(kw_only=True)
class TrainerOffload:
    """Offload / reload of one policy's optimizer state and gradient buffers (module doc).

    `model`: megatron's DistributedDataParallel (or a list of chunks); `optimizer`:
    the megatron optimizer built on it. `offload()` and `reload()` are idempotent and
    local to this rank (no collective)."""

    model: Any
    optimizer: Any
    copy_grads: bool = False
    offloaded: bool = False
    last: OffloadCounts = field(default_factory=OffloadCounts)
    _moved: list[tuple[torch.Tensor, torch.device]] = field(default_factory=list)
    _host: dict[int, torch.Tensor] = field(default_factory=dict)  # id(tensor) -> host buffer
    _grad_sizes: list[tuple[Any, int]] = field(default_factory=list)  # (buffer, nbytes)
    _grad_host: dict[int, torch.Tensor] = field(default_factory=dict)  # id(buffer) -> host copy

    # ------------------------------------------------------------------ offload
    def offload(self) -> OffloadCounts:
        """Move the optimizer state and main params to host, release the gradient
        buffers, then `torch.cuda.empty_cache()` so the freed blocks go back to the
        driver (for the servers). Returns the bytes freed."""
        if self.offloaded:
            return OffloadCounts()
        counts = OffloadCounts()
        model_storages = {
            _storage_key(p) for chunk in _chunks(self.model) for p in chunk.parameters()
        }
        self._moved = []
        for t in optimizer_tensors(self.optimizer, model_storages):
            host = self._host_buffer(self._host, t)
            host.copy_(t.data, non_blocking=_pinned(t))
            self._moved.append((t, t.device))
            counts.optimizer_bytes += t.numel() * t.element_size()
        for opt in inner_optimizers(self.optimizer):  # dead until the next zero_grad
            for p in _main_params(opt):
                p.grad = None
        self._grad_sizes = []
        for buf in grad_buffers(self.model):
            storage = buf.grad_data.untyped_storage()
            if storage.nbytes() == 0:
                continue
            if self.copy_grads:
                host = self._host_buffer(self._grad_host, buf.grad_data, key=id(buf))
                host.copy_(buf.grad_data, non_blocking=_pinned(buf.grad_data))
            self._grad_sizes.append((buf, storage.nbytes()))
        _synchronize()  # the copies above are done before their sources go
        for t, _ in self._moved:
            t.data = self._host[id(t)]
        for buf, nbytes in self._grad_sizes:
            buf.grad_data.untyped_storage().resize_(0)
            counts.grad_bytes += nbytes
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        self.offloaded = True
        self.last = counts
        return counts

    # ------------------------------------------------------------------ reload
    def reload(self) -> None:
        """Back to the device: the optimizer tensors (same objects, `.data` on their
        old device) and the gradient buffers (same storage objects, resized back;
        zeros, or the offloaded values with `copy_grads`)."""
        if not self.offloaded:
            return
        for t, device in self._moved:
            host = self._host[id(t)]
            t.data = host.to(device, non_blocking=device.type == "cuda", copy=True)
        for buf, nbytes in self._grad_sizes:
            buf.grad_data.untyped_storage().resize_(nbytes)
            if self.copy_grads:
                host = self._grad_host[id(buf)]
                buf.grad_data.copy_(host, non_blocking=_pinned(buf.grad_data))
            else:
                buf.grad_data.zero_()
        _synchronize()
        self._moved, self._grad_sizes = [], []
        self.offloaded = False

    # ------------------------------------------------------------------ helpers
    @staticmethod
    def _host_buffer(
        cache: dict[int, torch.Tensor], t: torch.Tensor, key: int | None = None
    ) -> torch.Tensor:
        """The host buffer for `t` (same shape and dtype; pinned when `t` is on CUDA),
        made on the first offload and reused after."""
        k = id(t) if key is None else key
        host = cache.get(k)
        if host is None or host.shape != t.shape or host.dtype != t.dtype:
            host = torch.empty(t.shape, dtype=t.dtype, device="cpu", pin_memory=_pinned(t))
            cache[k] = host
        return host


def _chunks(model: Any) -> list[Any]:
    return list(model) if isinstance(model, Sequence) else [model]


def _pinned(t: torch.Tensor) -> bool:
    """Whether `t`'s host buffer is pinned (and its copies asynchronous): on CUDA."""
    return t.device.type == "cuda" and torch.cuda.is_available()


def _synchronize() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()
