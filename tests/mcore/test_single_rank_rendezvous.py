"""A one-rank run rendezvouses without a port: `single_process_rendezvous` picks a free
port and releases it, and before this change the TCP store then bound it, so another
process taking the port in between failed the run with EADDRINUSE (seen in CI on
tests/monitoring/test_trackers.py). Reproduced here by holding the port."""

from __future__ import annotations

import os
import socket
import subprocess
import sys

CHILD = r"""
import os
import torch.distributed as dist
from archer_mcore.parallel.distributed import init_process_group
env = init_process_group(backend="gloo")
t = __import__("torch").ones(3)
dist.all_reduce(t)
print("ok", env.world_size, int(t.sum()))
dist.destroy_process_group()
"""


def test_one_rank_needs_no_free_port():
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE")}
        env.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        proc = subprocess.run(
            [sys.executable, "-c", CHILD], env=env, capture_output=True, text=True, timeout=120
        )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.split() == ["ok", "1", "3"]
