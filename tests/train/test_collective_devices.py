"""The trainer's host-side collectives work when the default group serves only the
accelerator, as NCCL does on every GPU job (issue 21, item 1).

Two ranks under torchrun run the real `archer train` (demo config, data parallel 2)
with the driver hook ``accelerator_only_world`` (tests/train/conftest.py): the default
group is gloo mapped to CUDA alone, so any CPU tensor or CPU-device object collective
on it raises, exactly where NCCL would; megatron's own groups stay on the CPU as in
every CPU run. Before parallel/ranks.control_group the run died at the end of step 1
("No backend type associated with device type cpu" in ranks.any_rank).

What this cannot show on a CPU: megatron-core's collectives over the default group
inside dist_checkpointing (the run here saves no checkpoint) and real NCCL; both run in
benchmarks/gpu_check.sh on a GPU.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _helpers_worker(rank: int, port: int, backend: str, out: str) -> None:
    from archer_mcore.parallel.ranks import any_rank, broadcast_object, destroy_control_group
    from archer_mcore.train.run_dir import parameters_finite

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group(backend=backend, rank=rank, world_size=2)
    try:
        layer = torch.nn.Linear(2, 2)
        if rank == 1:
            with torch.no_grad():
                layer.weight[0, 0] = float("nan")
        res = {
            "any": any_rank(rank == 1),
            "none": any_rank(False),
            "object": broadcast_object({"from": rank, "ids": list(range(rank, 5))}),
            "finite": parameters_finite(layer),
        }
        with open(f"{out}.{rank}", "w") as f:
            json.dump(res, f)
    finally:
        destroy_control_group()
        dist.destroy_process_group()


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["gloo", "cuda:gloo"])
def test_host_side_helpers_agree_across_ranks(tmp_path, backend: str) -> None:
    """any_rank, broadcast_object and parameters_finite on 2 ranks; "cuda:gloo" is a
    default group that refuses CPU tensors and CPU object collectives, as NCCL does."""
    out = str(tmp_path / "res")
    mp.start_processes(_helpers_worker, args=(_free_port(), backend, out), nprocs=2,
                       start_method="spawn")  # fmt: skip
    for rank in (0, 1):
        with open(f"{out}.{rank}") as f:
            res = json.load(f)
        assert res == {"any": True, "none": False, "object": {"from": 0, "ids": [0, 1, 2, 3, 4]},
                       "finite": False}, (rank, res)  # fmt: skip


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_loop_runs_when_the_default_group_serves_only_the_accelerator(archer, helpers, tmp_path):
    out = tmp_path / "run"
    overrides = [
        *helpers.FAST,
        "train.steps=2",
        "eval.every=2",  # the held-out eval's result is broadcast too
        "checkpoint.save_every=0",
        f"train.output_dir={out}",
    ]
    cmd = archer.command("train", overrides)
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone",
                "--nproc_per_node", "2"]  # fmt: skip
    proc = subprocess.run(
        [*torchrun, *cmd[1:]],
        cwd=str(helpers.DEMO_CONFIG.parents[1]),
        env=helpers.child_env({"accelerator_only_world": True}),
        capture_output=True, text=True, timeout=540, start_new_session=True,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    rows = helpers.read_metrics(out)
    assert [int(r["step"]) for r in rows] == [1, 2]
    assert "eval/accuracy" in rows[-1]
