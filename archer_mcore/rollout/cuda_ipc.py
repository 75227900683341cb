"""Sender side of SGLang's CUDA IPC contract for `/update_weights_from_tensor`.

The contract (SGLang 0.5.23, `sglang/srt/utils/patch_torch.py`,
`monkey_patch_torch_reductions`; read, not copied): torch pickles a CUDA tensor as
`(rebuild_cuda_tensor, args)` where `args[6]` is the *index* of the storage's device
in the sending process (torch.multiprocessing.reductions.reduce_tensor, unchanged since
torch 1.x; pytorch/pytorch#149248). An index means nothing in another process whose
CUDA_VISIBLE_DEVICES differ: a server started on physical GPUs 4..7 sees them as 0..3,
so a handle made on the trainer's device 4 is opened on the server's device 4 (another
GPU, or none). SGLang's receiver (`managers/tp_worker.py` deserialize_own_rank and
`model_runner_components/weight_updater.py` update_weights_from_tensor both apply the
patch before unpickling) replaces `rebuild_cuda_tensor` with one that accepts at
argument 6 either an int (used as is) or a device UUID string, which it maps to its own
index by comparing `str(torch.cuda.get_device_properties(i).uuid)` over its devices. The
sender is expected to put that UUID string there. SGLang's own sender patch does this
for every tensor, for good, and pickles its own rebuild function by name; this one:

* changes only CUDA results (a CPU tensor's reduction has three arguments and is
  returned untouched, so the CPU tests' shared-memory syncs are unaffected);
* keeps torch's `rebuild_cuda_tensor` as the pickled function, which the server
  resolves by name to SGLang's patched version (no archer import on the server);
* is applied only while a payload is pickled (`uuid_device_reductions()`), under a
  lock, and restored after, also on error.

While applied, another thread of this process pickling a CUDA tensor through torch's
ForkingPickler would also send a UUID; the trainer does not do that during a sync.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch.multiprocessing import reductions

#: Position of the storage device among rebuild_cuda_tensor's arguments (torch's
#: reduce_tensor; SGLang 0.5.23 `_REDUCE_TENSOR_ARG_DEVICE_INDEX`).
DEVICE_ARG = 6
#: Number of rebuild_cuda_tensor's arguments (torch 2.x reduce_tensor, CUDA branch).
CUDA_REBUILD_ARGS = 15

_lock = threading.RLock()
_active: dict[str, Any] = {}


def device_uuid(index: int) -> str:
    """The UUID of this process's CUDA device `index`, as SGLang compares it:
    `str(torch.cuda.get_device_properties(index).uuid)`."""
    return str(torch.cuda.get_device_properties(index).uuid)


def with_device_uuid(
    reduced: tuple[Callable[..., Any], tuple[Any, ...]], uuid_of: Callable[[int], str] | None = None
) -> tuple[Callable[..., Any], tuple[Any, ...]]:
    """A tensor's reduction with the device index of a CUDA rebuild replaced by the
    device's UUID (uuid_of, default `device_uuid`); any other reduction (CPU, meta, an
    argument already a UUID) as is."""
    fn, args = reduced
    if (
        fn is not reductions.rebuild_cuda_tensor
        or len(args) != CUDA_REBUILD_ARGS
        or not isinstance(args[DEVICE_ARG], int)
    ):
        return fn, args
    uuid = (uuid_of or device_uuid)(args[DEVICE_ARG])
    return fn, (*args[:DEVICE_ARG], uuid, *args[DEVICE_ARG + 1 :])


def reduce_tensor_with_uuid(tensor: torch.Tensor) -> tuple[Callable[..., Any], tuple[Any, ...]]:
    """The reducer registered while `uuid_device_reductions()` is active: torch's
    reduce_tensor (the one registered before), then `with_device_uuid`."""
    original = _active.get("reduce_tensor", reductions.reduce_tensor)
    return with_device_uuid(original(tensor))


@contextlib.contextmanager
def uuid_device_reductions() -> Iterator[None]:
    """Pickle CUDA tensors with their device's UUID (SGLang 0.5.23's contract, see the
    module docstring) inside the block; torch's reducers are registered again after it.
    Re-entrant; serialises concurrent users."""
    with _lock:
        if _active:  # nested: already applied
            yield
            return
        _active["reduce_tensor"] = reductions.reduce_tensor
        reductions.reduce_tensor = reduce_tensor_with_uuid  # type: ignore[assignment]
        try:
            reductions.init_reductions()  # registers reduce_tensor with ForkingPickler
            yield
        finally:
            reductions.reduce_tensor = _active.pop("reduce_tensor")
            reductions.init_reductions()
