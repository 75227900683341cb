"""benchmarks/kernel_bench.py runs end to end in --smoke mode (CPU, Triton interpreter)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_benchmark_smoke_prints_a_table_with_our_timings():
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "kernel_bench.py"), "--smoke"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=580,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    ours = [line for line in proc.stdout.splitlines() if "| ours (Triton" in line]
    assert len(ours) == 3  # kernel 1, and kernel 2's two recompute modes, at one shape
    for line in ours:
        fwd, fwd_bwd = (cell.strip() for cell in line.split("|")[3:5])
        assert float(fwd) > 0 and float(fwd_bwd) > 0
    assert "| case | implementation |" in proc.stdout
