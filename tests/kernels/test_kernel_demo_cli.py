"""`archer train configs/demo_cpu.yaml -o kernels.mode=triton` under TRITON_INTERPRET=1
runs 2 RL steps and its metrics equal the torch path's (1e-4). The warm start is
shortened to 200 steps (shared by both runs through one cache directory) so that some
groups are mixed and both steps update, and a step takes 16 prompts in mini-batches of 4
(the demo: 32 in 8s; the interpreted kernels took 109 s for 32, 36 s for 16, on 2 busy
cores); everything else is the demo's configuration."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from archer_mcore.metrics.keys import WALL_CLOCK_PREFIXES

ROOT = Path(__file__).resolve().parents[2]
# Wall-clock measurements differ between any two runs; everything else must agree.
TIMING_PREFIXES = WALL_CLOCK_PREFIXES


def _train(tmp: Path, mode: str) -> list[dict[str, float]]:
    out = tmp / mode
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "MASTER_PORT")}
    env.update(TRITON_INTERPRET="1", OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    cmd = [
        sys.executable,
        "-c",
        "import sys; from archer_mcore.cli import main; sys.exit(main())",
        "train",
        str(ROOT / "configs" / "demo_cpu.yaml"),
    ]
    for o in (
        f"kernels.mode={mode}",
        "train.steps=2",
        "warmstart.steps=200",
        "eval.every=0",
        "train.prompts_per_step=16",
        "train.mini_batch_prompts=4",
        f"train.output_dir={out}",
        f"warmstart.cache_dir={tmp / 'cache'}",
        "metrics.enabled=false",
    ):
        cmd += ["-o", o]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900, cwd=tmp)
    assert proc.returncode == 0, proc.stderr[-4000:]
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return rows


@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_demo_triton_path_matches_torch_path(tmp_path):
    torch_rows = _train(tmp_path, "torch")
    triton_rows = _train(tmp_path, "triton")
    assert [r["step"] for r in torch_rows] == [1.0, 2.0]
    assert [r["step"] for r in triton_rows] == [1.0, 2.0]
    compared = 0
    for a, b in zip(torch_rows, triton_rows):
        keys = {k for k in a if not k.startswith(TIMING_PREFIXES)}
        assert keys == {k for k in b if not k.startswith(TIMING_PREFIXES)}
        for k in sorted(keys):
            assert abs(a[k] - b[k]) <= 1e-4 * max(1.0, abs(a[k])), (a["step"], k, a[k], b[k])
            compared += 1
    assert compared > 20
    assert all(r["train/grad_norm"] > 0 for r in torch_rows)  # both steps updated
