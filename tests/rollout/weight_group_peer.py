"""Two sides of a weight-update group, as separate processes, for test_weight_group_net.py.

    weight_group_peer.py trainer ADDR PORT GROUP OUT_JSON TIMEOUT_S
        run under torchrun (any world size): the trainer's world is formed over gloo
        (env://, torchrun's agent store); rank 0 then forms the weight-update group of
        world 2 with archer_mcore.rollout.weight_sync.init_weight_update_group and
        broadcasts a tensor; every rank waits at a barrier of the trainer's world.
    weight_group_peer.py joiner ADDR PORT GROUP OUT_JSON TIMEOUT_S
        a plain process (no torchrun variables) that joins as rank 1 the way SGLang
        0.5.23's TP worker does (`sglang/srt/utils/common.py` init_custom_process_group:
        torch's tcp:// rendezvous, PrefixStore(group_name), _new_process_group_helper)
        and records the tensor it receives.

Each writes {"ok": bool, ...} to OUT_JSON and exits 0 on success, 1 on failure.
"""

from __future__ import annotations

import json
import os
import sys
import traceback
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist

SENT = [1.5 * k for k in range(6)]


def trainer(addr: str, port: int, group: str, timeout_s: float) -> dict[str, object]:
    from archer_mcore.rollout.weight_sync import (
        destroy_weight_update_group,
        init_weight_update_group,
    )

    dist.init_process_group("gloo", timeout=timedelta(seconds=60))
    out: dict[str, object] = {"rank": dist.get_rank(),
                              "agent_store": os.environ.get("TORCHELASTIC_USE_AGENT_STORE")}
    try:
        if dist.get_rank() == 0:
            pg = init_weight_update_group(backend="gloo", master_address=addr, master_port=port,
                                          rank=0, world_size=2, group_name=group,
                                          timeout_s=timeout_s)  # fmt: skip
            dist.broadcast(torch.tensor(SENT), src=0, group=pg)
            destroy_weight_update_group(pg)
        out["ok"] = True
    finally:
        dist.barrier()
        dist.destroy_process_group()
    return out


def joiner(addr: str, port: int, group: str, timeout_s: float) -> dict[str, object]:
    from torch.distributed.distributed_c10d import (
        Backend,
        PrefixStore,
        _new_process_group_helper,
        _world,
        rendezvous,
    )

    timeout = timedelta(seconds=timeout_s)
    store, rank, world = next(rendezvous(f"tcp://{addr}:{port}", 1, 2, timeout=timeout))
    store.set_timeout(timeout)
    store = PrefixStore(group, store)
    pg, _ = _new_process_group_helper(world, rank, [], Backend("gloo"), store,
                                      group_name=group, timeout=timeout,
                                      backend_options=None)  # fmt: skip
    _world.pg_group_ranks[pg] = {i: i for i in range(world)}
    t = torch.empty(len(SENT))
    dist.broadcast(t, src=0, group=pg)
    return {"ok": True, "received": t.tolist()}


def main() -> int:
    role, addr, port, group, out_path, timeout_s = sys.argv[1:7]
    fn = trainer if role == "trainer" else joiner
    try:
        out = fn(addr, int(port), group, float(timeout_s))
    except Exception:  # the test reads the failure from the file
        out = {"ok": False, "error": traceback.format_exc()[-2000:],
               "agent_store": os.environ.get("TORCHELASTIC_USE_AGENT_STORE")}
    path = Path(out_path)
    if role == "trainer":
        path = path.with_name(f"{path.stem}_rank{os.environ.get('RANK', '0')}.json")
    path.write_text(json.dumps(out))
    return 0 if out.get("ok") else 1


if __name__ == "__main__":
    sys.exit(main())
