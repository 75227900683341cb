"""Sender side of SGLang 0.5.23's CUDA IPC contract (rollout/cuda_ipc.py), on CPU.

What a CPU can show: the reducer is swapped into torch's ForkingPickler only while a
/update_weights_from_tensor payload is pickled and put back after (also on error); CPU
tensors pickle exactly as before; and a CUDA reduction leaves with the device's UUID
at argument 6 and torch's rebuild_cuda_tensor as the function. No CUDA tensor exists
on a CPU build, so the CUDA branch of torch's reduce_tensor is a stand-in here that
returns the tuple torch 2.x returns (`torch/multiprocessing/reductions.py`
reduce_tensor: 15 arguments, the device index at 6, from `storage._share_cuda_()`); the
real CUDA handle, made and opened across processes, is benchmarks/gpu_first_run.py's
check 3, and SGLang's receiver reading the UUID is
tests/sglang_real/test_real_ipc_contract.py."""

from __future__ import annotations

import io
import pickle
from collections.abc import Iterator
from multiprocessing.reduction import ForkingPickler
from typing import Any, ClassVar

import pytest
import torch
from torch.multiprocessing import reductions

from archer_mcore.rollout import cuda_ipc
from archer_mcore.rollout.cuda_ipc import (
    DEVICE_ARG,
    reduce_tensor_with_uuid,
    uuid_device_reductions,
    with_device_uuid,
)
from archer_mcore.rollout.sglang_protocol import serialize_named_tensors

FAKE_UUIDS = {0: "GPU-00000000-aaaa", 3: "GPU-33333333-dddd"}


def registered() -> Any:
    return ForkingPickler._extra_reducers[torch.Tensor]


def cuda_reduction(device: int) -> tuple[Any, tuple[Any, ...]]:
    """What torch's reduce_tensor returns for a float32 CUDA tensor of 2 elements on
    `device` (its CUDA branch; handles are opaque bytes)."""
    return (reductions.rebuild_cuda_tensor,
            (torch.Tensor, torch.Size([2]), (1,), 0, torch.storage.TypedStorage, torch.float32,
             device, b"cudaIpcMemHandle", 8, 0, False, b"refcount", 0, None, False))  # fmt: skip


class CudaLike(torch.Tensor):
    """Marks the tensor the stand-in reducer treats as a CUDA tensor."""


@pytest.fixture
def cuda_standin(monkeypatch: pytest.MonkeyPatch) -> Iterator[torch.Tensor]:
    """torch's reduce_tensor with its CUDA branch stood in for CudaLike tensors on
    device 3 (registered with ForkingPickler as torch's is, CudaLike dispatched like
    torch.Tensor), and device 3's UUID (torch.cuda.get_device_properties(3).uuid) faked."""
    original = reductions.reduce_tensor

    def reduce(t: torch.Tensor) -> Any:
        return cuda_reduction(3) if isinstance(t, CudaLike) else original(t)

    monkeypatch.setattr(reductions, "reduce_tensor", reduce)
    monkeypatch.setattr(cuda_ipc, "device_uuid", FAKE_UUIDS.__getitem__)
    monkeypatch.setattr(ForkingPickler, "_extra_reducers", dict(ForkingPickler._extra_reducers))
    ForkingPickler.register(CudaLike, lambda t: ForkingPickler._extra_reducers[torch.Tensor](t))
    reductions.init_reductions()
    yield torch.zeros(2).as_subclass(CudaLike)
    monkeypatch.undo()
    reductions.init_reductions()


class Recorder(pickle.Unpickler):
    """Unpickles with rebuild_cuda_tensor replaced by a recorder of its arguments (the
    server resolves that name to SGLang's patched rebuild)."""

    calls: ClassVar[list[tuple[Any, ...]]] = []

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) == ("torch.multiprocessing.reductions", "rebuild_cuda_tensor"):
            return lambda *a: Recorder.calls.append(a) or "rebuilt"
        return super().find_class(module, name)


def test_reducer_is_swapped_only_while_pickling_and_restored_after_errors():
    before = registered()
    assert before is reductions.reduce_tensor and before is not reduce_tensor_with_uuid
    with uuid_device_reductions():
        assert registered() is reduce_tensor_with_uuid
        with uuid_device_reductions():  # re-entrant
            assert registered() is reduce_tensor_with_uuid
        assert registered() is reduce_tensor_with_uuid
    assert registered() is before and reductions.reduce_tensor is before
    with pytest.raises(RuntimeError, match="boom"), uuid_device_reductions():
        raise RuntimeError("boom")
    assert registered() is before and reductions.reduce_tensor is before


def test_cpu_tensors_pickle_as_before():
    t = torch.arange(6, dtype=torch.float32).reshape(2, 3)
    with uuid_device_reductions():
        fn, args = reduce_tensor_with_uuid(t)
        payload = serialize_named_tensors([("w", t)])
    assert fn is reductions.rebuild_tensor and len(args) == 3
    import base64

    back = pickle.loads(base64.b64decode(payload))
    assert back[0][0] == "w" and torch.equal(back[0][1], t)


def test_cuda_reduction_carries_the_device_uuid(cuda_standin):
    # the pure rewrite: argument 6 only, other reductions untouched
    fn, args = with_device_uuid(cuda_reduction(3), uuid_of=FAKE_UUIDS.__getitem__)
    assert fn is reductions.rebuild_cuda_tensor
    assert args[DEVICE_ARG] == FAKE_UUIDS[3]
    want = cuda_reduction(3)[1]
    assert args == (*want[:DEVICE_ARG], FAKE_UUIDS[3], *want[DEVICE_ARG + 1 :])
    already = (*want[:DEVICE_ARG], "GPU-x", *want[DEVICE_ARG + 1 :])
    assert with_device_uuid((reductions.rebuild_cuda_tensor, already))[1] == already

    # through ForkingPickler, as the payload is made: the UUID is in the bytes and the
    # pickled function is torch's rebuild_cuda_tensor by name
    def dump() -> bytes:
        buf = io.BytesIO()
        ForkingPickler(buf).dump([("w", cuda_standin)])
        return buf.getvalue()

    with uuid_device_reductions():
        patched = dump()
    plain = dump()
    Recorder.calls = []
    Recorder(io.BytesIO(patched)).load()
    Recorder(io.BytesIO(plain)).load()
    assert [c[DEVICE_ARG] for c in Recorder.calls] == [FAKE_UUIDS[3], 3]


def test_tensor_sync_pickles_inside_the_patch(monkeypatch):
    """The engine's /update_weights_from_tensor path serialises under the patch."""
    from archer_mcore.rollout import sglang_weights
    from archer_mcore.rollout.sglang_engine import SGLangEngine
    from archer_mcore.rollout.sglang_protocol import WeightSyncConfig

    seen: list[bool] = []

    def spy(bucket: Any) -> str:
        seen.append(registered() is reduce_tensor_with_uuid)
        return serialize_named_tensors(bucket)

    monkeypatch.setattr(sglang_weights, "serialize_named_tensors", spy)
    engine = SGLangEngine(["http://127.0.0.1:9"], weight_sync=WeightSyncConfig(mode="tensor"),
                          check_servers=False)  # fmt: skip
    bodies: list[dict[str, Any]] = []

    async def request(method: str, url: str, json: Any = None, **kw: Any) -> Any:
        bodies.append(json)
        return {"success": True}

    monkeypatch.setattr(engine._client, "request", request)
    try:
        bucket = [("w", torch.ones(3))]
        engine._run(engine._send_tensors(engine.servers, [bucket, bucket], 1))
    finally:
        engine.shutdown()
    assert seen == [True, True] and len(bodies) == 2
    assert registered() is reductions.reduce_tensor
