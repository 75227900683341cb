"""Process-group and megatron model-parallel initialisation.

Rank/world come from torchrun (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT)
or from Slurm (SLURM_PROCID, SLURM_NTASKS, SLURM_LOCALID, SLURM_JOB_NODELIST; the master
is the first host of the node list). The backend is NCCL on GPUs and gloo on CPUs,
where the CPU compatibility layer is switched on as well.
"""

from __future__ import annotations

import os
import re
import socket
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

from archer_mcore.parallel import cpu_compat


@dataclass(frozen=True, kw_only=True)
class DistEnv:
    """Where this process sits in the job."""

    rank: int
    world_size: int
    local_rank: int
    master_addr: str
    master_port: int


def first_slurm_host(nodelist: str) -> str:
    """First host of a Slurm node list: "gpu[003-005,010],cpu1" -> "gpu003"."""
    m = re.match(r"\s*([^\[,]+)(?:\[([^\]]+)\])?", nodelist)
    if not m or not m.group(1).strip():
        raise ValueError(f"cannot parse SLURM_JOB_NODELIST {nodelist!r}")
    prefix, ranges = m.group(1).strip(), m.group(2)
    if ranges is None:
        return prefix
    return prefix + ranges.split(",")[0].split("-")[0]


def read_dist_env(env: dict[str, str] | None = None, default_port: int = 29500) -> DistEnv:
    """Rank layout from torchrun's variables, else Slurm's, else a single process."""
    env = dict(os.environ) if env is None else env
    if "RANK" in env and "WORLD_SIZE" in env:
        return DistEnv(
            rank=int(env["RANK"]),
            world_size=int(env["WORLD_SIZE"]),
            local_rank=int(env.get("LOCAL_RANK", "0")),
            master_addr=env.get("MASTER_ADDR", "127.0.0.1"),
            master_port=int(env.get("MASTER_PORT", default_port)),
        )
    if "SLURM_PROCID" in env and "SLURM_NTASKS" in env:
        nodelist = env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST") or "127.0.0.1"
        return DistEnv(
            rank=int(env["SLURM_PROCID"]),
            world_size=int(env["SLURM_NTASKS"]),
            local_rank=int(env.get("SLURM_LOCALID", "0")),
            master_addr=env.get("MASTER_ADDR", first_slurm_host(nodelist)),
            master_port=int(env.get("MASTER_PORT", default_port)),
        )
    return DistEnv(
        rank=0,
        world_size=1,
        local_rank=0,
        master_addr=env.get("MASTER_ADDR", "127.0.0.1"),
        master_port=int(env.get("MASTER_PORT", default_port)),
    )


def single_process_rendezvous() -> None:
    """Outside torchrun/srun, rendezvous on a free local port (not a fixed 29500).

    Sets MASTER_PORT (and MASTER_ADDR, when unset, to 127.0.0.1) in os.environ unless
    the process was launched by torchrun (RANK) or Slurm (SLURM_PROCID) or MASTER_PORT
    is already set: two single-process runs on one machine then never collide."""
    launched = "RANK" in os.environ or "SLURM_PROCID" in os.environ
    if not launched and "MASTER_PORT" not in os.environ:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            os.environ["MASTER_PORT"] = str(s.getsockname()[1])
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")


def default_backend() -> str:
    return "nccl" if torch.cuda.is_available() else "gloo"


def init_process_group(
    env: DistEnv | None = None, backend: str | None = None, timeout_s: float = 1800.0
) -> DistEnv:
    """Initialise torch.distributed (idempotent) and, on CPU, the compatibility layer.

    A world of one rank rendezvouses through an in-process store (`dist.HashStore`)
    and opens no port: a free port picked by `single_process_rendezvous` can be taken
    by another process before the TCP store binds it (EADDRINUSE, seen in CI)."""
    env = read_dist_env() if env is None else env
    if torch.cuda.is_available():
        torch.cuda.set_device(env.local_rank % torch.cuda.device_count())
    else:
        cpu_compat.activate()
    if not dist.is_initialized():
        rendezvous: dict[str, Any] = (
            {"store": dist.HashStore()}
            if env.world_size == 1
            else {"init_method": f"tcp://{env.master_addr}:{env.master_port}"}
        )
        dist.init_process_group(
            backend=backend or default_backend(),
            rank=env.rank,
            world_size=env.world_size,
            timeout=timedelta(seconds=timeout_s),
            **rendezvous,
        )
    return env


def init_model_parallel(tp: int = 1, pp: int = 1, seed: int = 1234, ep: int = 1) -> None:
    """megatron's TP/PP/DP groups (and EP: the MoE experts split over `ep` ranks of the
    data-parallel x TP ranks, expert TP = TP) plus its model-parallel RNG seeds."""
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

    world = dist.get_world_size()
    if world % (tp * pp) != 0:
        raise ValueError(f"world size {world} is not divisible by tp*pp = {tp}*{pp}")
    if world % (tp * pp * ep) != 0:
        raise ValueError(
            f"world size {world} is not divisible by tp*pp*ep = {tp}*{pp}*{ep} "
            "(parallel.expert_model_parallel_size)"
        )
    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=tp,
        pipeline_model_parallel_size=pp,
        expert_model_parallel_size=ep,
    )
    torch.manual_seed(seed)
    model_parallel_cuda_manual_seed(seed)


def init_distributed(
    tp: int = 1,
    pp: int = 1,
    seed: int = 1234,
    *,
    backend: str | None = None,
    timeout_s: float = 1800.0,
    ep: int = 1,
) -> DistEnv:
    """Both of the above: the one call a training process makes at start-up.
    `timeout_s`: the default group's (`parallel.collective_timeout_s`); `ep`:
    `parallel.expert_model_parallel_size` (MoE)."""
    env = init_process_group(backend=backend, timeout_s=timeout_s)
    init_model_parallel(tp, pp, seed, ep=ep)
    return env


def destroy_distributed() -> None:
    from megatron.core import parallel_state

    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()
