"""benchmarks/packing.py runs end to end (a small batch) and its figures hold up: packed
micro-batches have no padding, padded rows do, the log-probs of both batchings agree,
and the padded shares match a hand count over the same lengths."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_packing_benchmark_smoke(tmp_path):
    out = tmp_path / "packing.json"
    cmd = [sys.executable, str(ROOT / "benchmarks" / "packing.py"), "--sequences", "12"]
    cmd += ["--repeats", "1", "--scale", "64", "--json", str(out)]
    env = {"MASTER_PORT": "29617", "PATH": "/usr/bin:/bin"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=560, env=env, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "## Packed micro-batches" in proc.stdout
    res = json.loads(out.read_text())
    for mix in ("demo", "lognormal_scaled"):
        r = res[mix]
        assert r["true"]["padded"] == 0.0 and r["false"]["padded"] > 0.0
        assert r["true"]["microbatches"] <= r["false"]["microbatches"]
        assert r["max_logp_diff"] < 1e-5
        assert r["true"]["attn_entries"] < r["false"]["attn_entries"]
    # demo: one micro-batch either way (16384 tokens hold the 12 sequences), so the
    # padded rows' padding is 1 - mean / max of the demo lengths
    demo = res["demo"]
    assert demo["false"]["microbatches"] == 1
    expect = 1 - demo["mean_len"] / demo["max_len"]
    assert abs(demo["false"]["padded"] - expect) < 1e-9
    for v in res["lognormal_full_scale"].values():
        assert v["packed"]["padded"] < v["padded"]["padded"]
