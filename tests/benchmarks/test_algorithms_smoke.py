"""benchmarks/algorithms.py --smoke: real `archer train` runs from one warm start, two seeds,
an algorithm, a one-factor ablation with its reference, the collapse regime, and the
rerun-reproduces check."""

from __future__ import annotations

import json
import struct
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
VARIANTS = ("grpo", "grpo-seqmean", "archer-hot")
SEEDS = (1234, 1235)


def png_size(path: Path) -> tuple[int, int]:
    """Width and height from the PNG signature and IHDR chunk (PNG spec, section 11.2.2)."""
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG"
    assert data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_smoke_runs_sections_with_intervals_and_a_repro_check(tmp_path: Path):
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
        timeout=590,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]

    # one figure, table and summary per section
    for section, names in {
        "algorithms": ["grpo"],
        "ablations": ["grpo", "grpo-seqmean"],
        "collapse": ["archer-hot"],
    }.items():
        width, height = png_size(out / f"{section}.png")
        assert width > 1000 and height > 500
        summary = json.loads((out / f"summary_{section}.json").read_text())
        assert [v["variant"] for v in summary["variants"]] == names
        for v in summary["variants"]:
            assert v["seeds_ok"] == 2 and v["seeds_failed"] == 0
            # the interval of avg@4 is over both seeds' final evals
            per_seed = v["per_seed"]["avg@4"]
            assert sorted(int(s) for s in per_seed) == list(SEEDS)
            assert v["interval"]["avg@4"][2] == 2
            assert v["interval"]["pass@4"][0] >= v["interval"]["avg@4"][0]
    abl = json.loads((out / "summary_ablations.json").read_text())["variants"]
    diff = abl[1]["vs_reference"]["entropy_end/all"]
    seq, ref = abl[1]["per_seed"]["entropy_end/all"], abl[0]["per_seed"]["entropy_end/all"]
    assert diff[0] == pytest.approx(sum(seq[s] - ref[s] for s in seq) / 2)

    # the variants' overrides reached the trainer
    for name in VARIANTS:
        for seed in SEEDS:
            run = out / "runs" / f"{name}_s{seed}"
            command = (run / "command.txt").read_text().split()
            assert f"train.seed={seed}" in command and "warmstart.steps=0" in command
            rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
            assert [r["step"] for r in rows] == [1.0, 2.0]
            # pass@1 and pass@4 of the 4 eval samples, in metrics.jsonl and the eval file
            assert {"eval/accuracy", "eval/pass@1", "eval/pass@4"} <= set(rows[-1])
            assert rows[-1]["eval/pass@1"] == pytest.approx(rows[-1]["eval/accuracy"])
    hot = (out / "runs" / "archer-hot_s1234" / "command.txt").read_text()
    assert "train.ppo_epochs=2" in hot and "algorithm.name=archer" in hot
    assert (
        "algorithm.agg_mode=seq-mean-token-mean"
        in (out / "runs" / "grpo-seqmean_s1234" / "command.txt").read_text()
    )
    # the regime's extra epochs: 2 epochs x 2 mini-batches of updates per step; archer
    # logs its knowledge / reasoning groups
    hot_rows = [
        json.loads(x)
        for x in (out / "runs" / "archer-hot_s1234" / "metrics.jsonl").read_text().splitlines()
    ]
    assert {"entropy/knowledge", "entropy/reasoning"} <= set(hot_rows[-1])

    # rerunning a seed from scratch reproduces it exactly
    repro = json.loads((out / "reproducibility.json").read_text())
    assert repro["run"] == "grpo_s1234" and repro["differences"] == []

    # one RESULTS.md section per benchmark section, each with its figure
    text = (out / "RESULTS.md").read_text()
    for heading, png in (
        ("## Algorithm comparison (CPU demo task)", "algorithms.png"),
        ("## Archer ablations: which factor moves the result (CPU demo task)", "ablations.png"),
        ("## A collapse-prone regime: entropy and pass@k (CPU demo task)", "collapse.png"),
    ):
        assert text.count(heading) == 1 and f"]({png})" in text
    assert "identical" in text
    assert "`grpo-seqmean` − `grpo` | 2 |" in text
