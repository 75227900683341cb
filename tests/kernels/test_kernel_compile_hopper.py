"""Every kernel variant compiles for Hopper (sm_90) with the real Triton compiler and
ptxas, without a GPU: the interpreter used by the other tests accepts programs the
compiler would reject."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_all_kernels_compile_for_sm90(tmp_path):
    # A fresh cache: really compile, do not read an earlier build back.
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path)
    cmd = [sys.executable, "-m", "archer_mcore.kernels.compile_check", "--arch", "90"]
    proc = subprocess.run(
        [*cmd, "--dtype", "bf16"],  # the production dtype; fp32 doubles the time
        env=env,
        capture_output=True,
        text=True,
        timeout=880,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    names = {line.split()[2] for line in proc.stdout.splitlines() if line.startswith("ok ")}
    assert names == {
        "_stats_kernel",
        "_grad_kernel",
        "_lm_head_stats_kernel",
        "_lm_head_grad_kernel",
        "_loss_fwd_kernel",
        "_loss_bwd_kernel",
    }
    # Hopper has 227 KiB of shared memory per block; every tile config must fit.
    for line in proc.stdout.splitlines():
        if line.startswith("ok "):
            assert int(line.rsplit("shared=", 1)[1].rstrip("B")) <= 227 * 1024, line
