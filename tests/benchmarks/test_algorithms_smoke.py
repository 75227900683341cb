"""benchmarks/algorithms.py --smoke: four real `archer train` runs from one warm start."""

from __future__ import annotations

import json
import struct
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
ALGOS = ("grpo", "dapo", "archer", "forking")


def png_size(path: Path) -> tuple[int, int]:
    """Width and height from the PNG signature and IHDR chunk (PNG spec, section 11.2.2)."""
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG"
    assert data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_smoke_runs_every_algorithm_from_one_warm_start(tmp_path: Path):
    out = tmp_path / "bench"
    proc = subprocess.run(
        [
            sys.executable,
            str(ROOT / "benchmarks" / "algorithms.py"),
            "--smoke",
            "--jobs",
            "2",
            "--out-dir",
            str(out),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=290,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]

    width, height = png_size(out / "algorithms.png")
    assert width > 500 and height > 200

    table = (out / "table.md").read_text().splitlines()
    rows = {line.split("|")[1].strip(): line for line in table[2:]}
    assert set(rows) == set(ALGOS)
    for algo in ALGOS:
        cells = [c.strip() for c in rows[algo].split("|")[1:-1]]
        assert cells[1] == "1"  # one seed, none failed
        assert cells[3] != "n/a"  # a final held-out accuracy

    section = (out / "RESULTS.md").read_text()
    assert section.count("## Algorithm comparison (CPU demo task)") == 1
    assert "](algorithms.png)" in section

    baselines, model_paths = set(), set()
    for algo in ALGOS:
        run = out / "runs" / f"{algo}_s1234"
        metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
        assert [m["step"] for m in metrics] == [1.0, 2.0]
        assert all("eval/accuracy" in m for m in metrics)  # smoke evals every step
        # every run loads the one shared warm start instead of training its own
        command = (run / "command.txt").read_text().split()
        assert "warmstart.steps=0" in command
        model_paths |= {
            a.removeprefix("model.path=") for a in command if a.startswith("model.path=")
        }
        assert f"algorithm.name={algo}" in command
        baselines.add((run / "eval" / "step_000000.json").read_text())
    (model_path,) = model_paths
    assert (Path(model_path) / "DONE").exists() and (
        Path(model_path) / "model.safetensors"
    ).exists()
    # Same weights and the same eval sampling seed (train.seed + 7): identical step-0 evals.
    assert len(baselines) == 1

    summary = json.loads((out / "summary.json").read_text())
    by_algo = {row["algorithm"]: row for row in summary["table"]}
    # GRPO keeps every group: 2 steps x 4 prompts x 4 samples = 32 responses, and updates
    # every step (entropy is logged by each update).
    assert by_algo["grpo"]["samples"][0] == 32
    assert by_algo["grpo"]["updates"][0] == 2
    # DAPO / forking refill: 1 to max_generation_batches (2) batches of 16 per step.
    for algo in ("dapo", "forking"):
        assert by_algo[algo]["samples"][0] in (32, 48, 64)
