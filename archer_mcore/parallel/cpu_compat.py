"""Run megatron-core on a machine without CUDA.

megatron-core assumes a GPU in a handful of places: factory calls with
``device="cuda"`` / ``device=torch.cuda.current_device()``, ``tensor.cuda()``,
``torch.cuda.synchronize()``, and the CUDA RNG helpers behind its RNG tracker. The
layer here maps all of that to the CPU:

- a ``torch.overrides.TorchFunctionMode`` rewrites CUDA device arguments (strings,
  ``torch.device`` objects and bare device indices) to ``cpu``, makes ``.cuda()`` and
  ``pin_memory`` no-ops, and reports CPU tensors' ``.type()`` as the CUDA type name
  (megatron's optimizers dispatch on those names);
- ``torch.cuda.current_device/synchronize/...`` get CPU stand-ins, and so do
  ``torch.cuda.Stream/Event/current_stream/stream`` (megatron's MoE all-to-all token
  dispatcher copies its split sizes to the host on a side stream): the CPU has one
  in-order stream, so waits and synchronisations are no-ops;
- megatron's ``_get_cuda_rng_state``/``_set_cuda_rng_state`` and the tracker's
  ``torch.cuda.get_rng_state/manual_seed`` are mapped onto the CPU default generator.

It never activates when CUDA is available (``activate`` returns False and does
nothing). Use ``cpu_compat()`` as a context manager to scope it, or ``activate()``
for the rest of the process; ``deactivate()`` undoes ``activate()``.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Callable, Iterator
from typing import Any, ClassVar

import torch
from torch.overrides import TorchFunctionMode

_CPU = torch.device("cpu")


def _is_cuda_device(device: Any) -> bool:
    if isinstance(device, torch.device):
        return device.type == "cuda"
    if isinstance(device, str):
        return device.startswith("cuda")
    # A bare int means a CUDA index in torch's factory functions (torch.cuda.current_device()).
    return isinstance(device, int) and not isinstance(device, bool)


def _map_device(device: Any) -> Any:
    return _CPU if _is_cuda_device(device) else device


def _backward_under_mode(
    tensors: Any,
    grad_tensors: Any = None,
    retain_graph: bool | None = None,
    create_graph: bool = False,
    inputs: Any = None,
) -> None:
    """torch.autograd.backward's body, run with the layer re-pushed.

    torch pops a function mode while its handler runs, and since torch 2.13
    autograd.backward itself goes through the handler, so the whole backward pass
    (including megatron's activation-recompute forward, which creates tensors on
    "cuda") would otherwise run without the layer."""
    from torch.autograd import _make_grads, _tensor_or_tensors_to_tuple
    from torch.autograd.graph import _engine_run_backward

    tensors = (tensors,) if isinstance(tensors, torch.Tensor) else tuple(tensors)
    grads = _make_grads(
        tensors, _tensor_or_tensors_to_tuple(grad_tensors, len(tensors)), is_grads_batched=False
    )
    if retain_graph is None:
        retain_graph = create_graph
    inputs_tuple = (
        () if inputs is None else ((inputs,) if isinstance(inputs, torch.Tensor) else tuple(inputs))
    )
    with CudaToCpuMode():
        _engine_run_backward(
            tensors,
            grads,
            retain_graph,
            create_graph,
            inputs_tuple,
            allow_unreachable=True,
            accumulate_grad=True,
        )


class CudaToCpuMode(TorchFunctionMode):
    """Rewrites CUDA device requests in torch calls to the CPU."""

    def __torch_function__(self, func, types, args=(), kwargs=None):  # type: ignore[override]
        kwargs = dict(kwargs or {})
        if func is torch.autograd.backward:
            return _backward_under_mode(*args, **kwargs)
        if func is torch.Tensor.backward:
            self_t, *rest = args
            if rest:
                kwargs.setdefault("gradient", rest[0])
            return _backward_under_mode(
                self_t,
                kwargs.get("gradient"),
                kwargs.get("retain_graph"),
                kwargs.get("create_graph", False),
                kwargs.get("inputs"),
            )
        if func is torch.Tensor.cuda:
            return args[0]
        if func is torch.Tensor.pin_memory:
            return args[0]
        if func is torch.Tensor.is_pinned:
            return False
        if func is torch.Tensor.type and len(args) == 1 and not kwargs:
            # megatron's optimizers dispatch on "torch.cuda.FloatTensor"-style names.
            name = func(*args)
            return (
                name.replace("torch.", "torch.cuda.", 1)
                if not name.startswith("torch.cuda.")
                else name
            )
        if "device" in kwargs:
            kwargs["device"] = _map_device(kwargs["device"])
        if kwargs.get("pin_memory"):
            kwargs["pin_memory"] = False
        if func is torch.Tensor.to and len(args) > 1:
            # .to(device[, dtype]); a bare int here is a CUDA index (torch.cuda.current_device()).
            args = (args[0], _map_device(args[1]), *args[2:])
        return func(*args, **kwargs)


# ---------------------------------------------------------------- CPU stand-ins
def _current_device() -> int:
    return 0


def _noop(*_args: Any, **_kwargs: Any) -> None:
    return None


def _get_rng_state(device: Any = "cuda", *args: Any, **kwargs: Any) -> torch.Tensor:
    return torch.get_rng_state()


def _set_rng_state(new_state: torch.Tensor, *args: Any, **kwargs: Any) -> None:
    torch.set_rng_state(new_state.cpu())


def _manual_seed(seed: int) -> None:
    # Not torch.manual_seed: that calls torch.cuda.manual_seed_all (this function) again.
    torch.default_generator.manual_seed(int(seed))


def _mem_zero(*_args: Any, **_kwargs: Any) -> int:
    return 0


def _fresh(fn: Callable[..., Any]) -> Callable[..., Any]:
    """A distinct function object per patched name: torch._dynamo's rule map rejects one
    object registered under two torch.cuda names."""

    def stand_in(*args: Any, **kwargs: Any) -> Any:
        return fn(*args, **kwargs)

    stand_in.__name__ = stand_in.__qualname__ = f"cpu_{fn.__name__.lstrip('_')}"
    return stand_in


class _CpuEvent:
    """torch.cuda.Event's calls megatron makes, for CPU work (already finished when
    recorded: the CPU runs one stream, in order)."""

    def __init__(self, *_args: Any, **_kwargs: Any) -> None:
        return None

    def synchronize(self) -> None:
        return None

    def wait(self, stream: Any = None) -> None:
        return None

    def query(self) -> bool:
        return True

    def record(self, stream: Any = None) -> None:
        return None


class _CpuStream:
    """torch.cuda.Stream's calls megatron's MoE all-to-all dispatcher makes (a side
    stream for its device-to-host copies, `token_dispatcher.py`), for the CPU's one
    in-order stream: waits and synchronisations are no-ops."""

    def __init__(self, *_args: Any, **_kwargs: Any) -> None:
        return None

    def wait_stream(self, stream: Any) -> None:
        return None

    def wait_event(self, event: Any) -> None:
        return None

    def record_event(self, event: Any = None) -> _CpuEvent:
        return event if event is not None else _CpuEvent()

    def synchronize(self) -> None:
        return None

    def query(self) -> bool:
        return True


_CURRENT_STREAM = _CpuStream()


def _current_stream(*_args: Any, **_kwargs: Any) -> _CpuStream:
    return _CURRENT_STREAM


def _stream_context(stream: Any = None) -> contextlib.AbstractContextManager[Any]:
    return contextlib.nullcontext(stream)


def _host_copy(tensor: Any, as_numpy: bool = False, record_stream: bool = False) -> Any:
    """megatron's `moe_utils.maybe_move_tensor_to_cpu` for tensors that already are on
    the host: the same result as its device-to-host copy (a numpy array when
    `as_numpy`; the all-to-all's split sizes must be host numbers). Its own version
    only converts CUDA tensors, so on the CPU the split sizes stayed tensors and
    `all_to_all_single` refused them."""
    if torch.is_tensor(tensor):
        host = tensor.detach().clone()
        return host.numpy() if as_numpy else host
    return tensor


def _patch_table() -> list[tuple[Any, str, Callable[..., Any]]]:
    """(owner, attribute, replacement) for every patched attribute."""
    import megatron.core.models.gpt  # noqa: F401  (import-time torch.compile before patching)
    import megatron.core.tensor_parallel.random as mrandom
    import megatron.core.transformer.moe.token_dispatcher as moe_dispatch

    table: list[tuple[Any, str, Callable[..., Any]]] = [
        (torch.cuda, "current_device", _current_device),
        (torch.cuda, "synchronize", _noop),
        (torch.cuda, "set_device", _noop),
        (torch.cuda, "empty_cache", _noop),
        (torch.cuda, "get_rng_state", _get_rng_state),
        (torch.cuda, "set_rng_state", _set_rng_state),
        (torch.cuda, "manual_seed", _manual_seed),
        (torch.cuda, "manual_seed_all", _noop),  # torch.manual_seed already seeded the CPU
        (torch.cuda, "memory_allocated", _mem_zero),
        (torch.cuda, "max_memory_allocated", _mem_zero),
        (torch.cuda, "current_stream", _current_stream),
        (torch.cuda, "stream", _stream_context),
        (torch.cuda.random, "get_rng_state", _get_rng_state),
        (torch.cuda.random, "set_rng_state", _set_rng_state),
        (mrandom, "_get_cuda_rng_state", _get_rng_state),
        (mrandom, "_set_cuda_rng_state", _set_rng_state),
        (moe_dispatch, "maybe_move_tensor_to_cpu", _host_copy),
    ]
    classes: list[tuple[Any, str, Any]] = [  # types: annotations use `torch.cuda.Stream | None`
        (torch.cuda, "Stream", _CpuStream),
        (torch.cuda, "Event", _CpuEvent),
    ]
    return [(owner, name, _fresh(fn)) for owner, name, fn in table] + classes


class _QuietRngFork(logging.Filter):
    """On CPU the "CUDA" RNG *is* the CPU generator, so megatron's warning that the CPU RNG
    changed inside a tracker fork is expected noise."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "CPU RNG state changed within GPU RNG context" not in record.getMessage()


_QUIET = _QuietRngFork()
_RNG_LOGGER = "megatron.core.tensor_parallel.random"


class _State:
    lock = threading.Lock()
    depth = 0
    saved: ClassVar[list[tuple[Any, str, Any]]] = []
    mode: CudaToCpuMode | None = None


def cuda_available() -> bool:
    return torch.cuda.is_available()


def is_active() -> bool:
    return _State.depth > 0


def activate() -> bool:
    """Turn the layer on (re-entrant). Returns False, doing nothing, when CUDA is available."""
    if cuda_available():
        return False
    with _State.lock:
        if _State.depth == 0:
            table = _patch_table()
            _State.saved = [(o, n, getattr(o, n)) for o, n, _ in table]
            for owner, name, fn in table:
                setattr(owner, name, fn)
            _State.mode = CudaToCpuMode()
            _State.mode.__enter__()
            logging.getLogger(_RNG_LOGGER).addFilter(_QUIET)
        _State.depth += 1
    return True


def deactivate() -> None:
    """Undo one `activate()`; the last one restores every patched attribute."""
    with _State.lock:
        if _State.depth == 0:
            return
        _State.depth -= 1
        if _State.depth == 0:
            assert _State.mode is not None
            _State.mode.__exit__(None, None, None)
            _State.mode = None
            logging.getLogger(_RNG_LOGGER).removeFilter(_QUIET)
            for owner, name, orig in _State.saved:
                setattr(owner, name, orig)
            _State.saved = []


@contextlib.contextmanager
def cpu_compat() -> Iterator[bool]:
    """Scope the layer: ``with cpu_compat() as active: ...`` (active is False on GPUs)."""
    active = activate()
    try:
        yield active
    finally:
        if active:
            deactivate()


@contextlib.contextmanager
def suspended() -> Iterator[None]:
    """Temporarily lift the function mode (e.g. around a checkpoint writer)."""
    if _State.mode is None:
        yield
        return
    from torch.overrides import _pop_mode_temporarily

    with _pop_mode_temporarily():
        yield
