"""benchmarks/checkpoint_io.py runs end to end on a tiny shape (plumbing only; its
timings mean nothing) and its old and new manifests agree (the script asserts it)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_checkpoint_io_benchmark_smoke(tmp_path):
    out = tmp_path / "rows.json"
    subprocess.run(
        [
            sys.executable,
            str(REPO / "benchmarks" / "checkpoint_io.py"),
            "--shapes",
            "tiny",
            "--ranks",
            "1,2",
            "--repeats",
            "1",
            "--dir",
            str(tmp_path / "work"),
            "--out",
            str(out),
        ],
        check=True,
        timeout=280,
    )
    rows = json.loads(out.read_text())
    assert [(r["shape"], r["world"]) for r in rows] == [("tiny", 1), ("tiny", 2)]
    assert rows[0]["bytes"] == rows[1]["bytes"] > 0
    assert rows[0]["files"] == 4 and rows[1]["files"] == 5  # one shard file per rank
    for r in rows:
        assert r["verify_new_s"] > 0 and r["manifest_new_s"] > 0
