"""benchmarks/gpu_check.sh --smoke: the prepared GPU check runs end to end on CPU
(Triton interpreter, tiny shapes): the three benchmarks, every kernel path, the same
log-probs on every path, the first-GPU-run checks, results written."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_gpu_check_smoke(tmp_path):
    env = dict(os.environ, PYTHON=sys.executable, PYTHONWARNINGS="ignore")
    proc = subprocess.run(
        ["bash", str(ROOT / "benchmarks" / "gpu_check.sh"), "--smoke", "--out", str(tmp_path)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=880,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "| ours (Triton" in (tmp_path / "kernels.md").read_text()
    table = (tmp_path / "gpu_check.md").read_text()
    assert "| path | score tok/s | train tok/s |" in table
    res = json.loads((tmp_path / "gpu_check.json").read_text())
    paths = [r["path"] for r in res["results"]]
    assert paths == ["torch", "triton", "torch+lm_head", "triton+lm_head"]
    for r in res["results"]:
        assert r["train_tokens_per_s"] > 0 and r["score_tokens_per_s"] > 0
        assert r["max_abs_logprob_diff_vs_torch"] < 1e-5, r
    assert (tmp_path / "env.txt").read_text().count("megatron-core") == 1
    first = json.loads((tmp_path / "gpu_first_run.json").read_text())
    rule = first["device_rule"]  # the CPU stand-in for NCCL refuses a CPU tensor too
    assert rule["cpu_tensor_on_default"].startswith("refused") and not rule["default_serves_cpu"]
    assert rule["control_collectives"] == "ok"
    assert first["autotune"]["micro_batches"] == 4
