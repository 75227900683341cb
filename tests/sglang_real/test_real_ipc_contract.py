"""The receiver side of the CUDA IPC contract, in the installed SGLang 0.5.23
(issue 21, item 3c): a /update_weights_from_tensor payload made by the engine's
serialiser under rollout/cuda_ipc.py is unpickled by SGLang's own
MultiprocessingSerializer.deserialize after its monkey_patch_torch_reductions (what
`managers/tp_worker.py` deserialize_own_rank does), in SGLang's venv.

No GPU here: the sender's CUDA branch of torch's reduce_tensor is a stand-in returning
torch's 15-argument tuple for a tensor on the trainer's device 3, and on the server side
torch.cuda's device list is a stand-in of two devices (the server's CUDA_VISIBLE_DEVICES
shows it physical GPUs 2 and 3 as 0 and 1) and rebuild_cuda_tensor's CUDA part a
recorder. What runs for real: SGLang's patched rebuild, its UUID-to-index lookup and its
safe unpickler (which must allow the pickled function). With the UUID the server opens
the handle on its device 1 (physical 3); torch's plain index, 3, names a device the
server does not have."""

from __future__ import annotations

import json
import os
import subprocess
from multiprocessing.reduction import ForkingPickler

import pytest
import torch
from sglang_harness import SHIMS, sglang_python
from torch.multiprocessing import reductions

from archer_mcore.rollout import cuda_ipc
from archer_mcore.rollout.sglang_protocol import serialize_named_tensors

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]
SERVER_UUIDS = ["GPU-2222-physical-2", "GPU-3333-physical-3"]  # the server's devices 0, 1
TRAINER_DEVICE = 3  # the same physical GPU 3, as the trainer (all GPUs visible) numbers it

RECEIVER = r"""
import json, sys, types
import torch
from torch.multiprocessing import reductions
uuids = json.loads(sys.argv[1])
torch.cuda.device_count = lambda: len(uuids)
torch.cuda.get_device_properties = lambda i: types.SimpleNamespace(uuid=uuids[i])
from sglang.srt.utils.patch_torch import monkey_patch_torch_reductions
from sglang.srt.utils.common import MultiprocessingSerializer
monkey_patch_torch_reductions()
seen = []
def record(*args):
    seen.append(args[6])
    return torch.zeros(2)
reductions._rebuild_cuda_tensor_original = record
out = []
for payload in sys.stdin.read().split():
    seen.clear()
    try:
        named = MultiprocessingSerializer.deserialize(payload)
        out.append({"names": [n for n, _ in named], "device": seen[0]})
    except Exception as e:
        out.append({"error": f"{type(e).__name__}: {e}"})
print(json.dumps(out))
"""


class CudaLike(torch.Tensor):
    """The tensor the stand-in reducer treats as a CUDA tensor on TRAINER_DEVICE."""


def test_sglang_opens_the_handle_on_the_device_the_uuid_names(monkeypatch):
    original = reductions.reduce_tensor

    def reduce(t: torch.Tensor):
        if not isinstance(t, CudaLike):
            return original(t)
        return (reductions.rebuild_cuda_tensor,
                (torch.Tensor, torch.Size([2]), (1,), 0, torch.storage.TypedStorage,
                 torch.float32, TRAINER_DEVICE, b"cudaIpcMemHandle", 8, 0, False, b"refcount",
                 0, None, False))  # fmt: skip

    monkeypatch.setattr(reductions, "reduce_tensor", reduce)
    monkeypatch.setattr(cuda_ipc, "device_uuid", {TRAINER_DEVICE: SERVER_UUIDS[1]}.__getitem__)
    monkeypatch.setattr(ForkingPickler, "_extra_reducers", dict(ForkingPickler._extra_reducers))
    ForkingPickler.register(CudaLike, lambda t: ForkingPickler._extra_reducers[torch.Tensor](t))
    reductions.init_reductions()
    try:
        bucket = [("model.layers.0.mlp.down_proj.weight", torch.zeros(2).as_subclass(CudaLike))]
        with cuda_ipc.uuid_device_reductions():
            with_uuid = serialize_named_tensors(bucket)
        plain = serialize_named_tensors(bucket)
    finally:
        monkeypatch.undo()
        reductions.init_reductions()

    env = {**os.environ, "PYTHONPATH": str(SHIMS), "SGLANG_USE_CPU_ENGINE": "1"}
    r = subprocess.run([str(sglang_python()), "-c", RECEIVER, json.dumps(SERVER_UUIDS)],
                       input=f"{with_uuid}\n{plain}\n", capture_output=True, text=True,
                       env=env, timeout=240)  # fmt: skip
    assert r.returncode == 0, r.stderr[-3000:]
    got = json.loads(r.stdout.strip().splitlines()[-1])
    assert got[0] == {"names": ["model.layers.0.mlp.down_proj.weight"], "device": 1}, got
    assert got[1]["device"] == TRAINER_DEVICE, got  # without the patch: a wrong index
