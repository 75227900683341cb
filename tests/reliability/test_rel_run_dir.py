"""The output directory (issue 14, items 1, 2, 4, 5): one run at a time, no fresh run
into an earlier run's checkpoints, pruning that never deletes the checkpoint just
written, resume that skips a damaged newest checkpoint, and the weight check.

Checkpoints here are hand-made step directories with a MANIFEST.json in the documented
format (file -> [size, CRC32], computed with zlib here), so that verification, pruning
and the fall-back are checked without megatron; the trainer tests in
tests/train/test_rel_trainer.py do the same with real runs."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import zlib
from pathlib import Path

import pytest
import torch

from archer_mcore.actor.checkpoint_store import CheckpointError, _prune, latest_valid_checkpoint
from archer_mcore.cli import main
from archer_mcore.train.run_dir import (
    LOCK_NAME,
    RunDirError,
    RunDirLock,
    check_fresh_start,
    parameters_finite,
)

REPO = Path(__file__).resolve().parents[2]
DEMO = REPO / "configs" / "demo_cpu.yaml"


def fake_checkpoint(root: Path, step: int, payload: bytes = b"weights") -> Path:
    d = root / f"step_{step:08d}"
    (d / "dist").mkdir(parents=True)
    (d / "dist" / "0.distcp").write_bytes(payload)
    manifest = {
        "format_version": 1,
        "step": step,
        "files": {"dist/0.distcp": [len(payload), zlib.crc32(payload)]},
    }
    (d / "MANIFEST.json").write_text(json.dumps(manifest))
    return d


# ------------------------------------------------------------------ item 1: pruning
def test_prune_never_deletes_the_checkpoint_just_written(tmp_path: Path) -> None:
    # An earlier run left step 6 and step 8; this run just wrote step 1 (keep_last 2).
    # On main, keep-last-K kept the highest numbers and deleted step 1 at once.
    for s in (6, 8, 1):
        fake_checkpoint(tmp_path, s)
    _prune(tmp_path, 2, tmp_path / "step_00000001")
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "step_00000001",
        "step_00000006",
        "step_00000008",
    ]
    # Steps 2..5 written in turn: the newest two at or below the current step stay.
    for s in (2, 3, 4, 5):
        fake_checkpoint(tmp_path, s)
        _prune(tmp_path, 2, tmp_path / f"step_{s:08d}")
        names = sorted(p.name for p in tmp_path.iterdir())
        assert names == [f"step_{s - 1:08d}", f"step_{s:08d}", "step_00000006", "step_00000008"]
    # keep_last 1 keeps exactly the one just written among the older ones
    _prune(tmp_path, 1, tmp_path / "step_00000005")
    assert not (tmp_path / "step_00000004").exists() and (tmp_path / "step_00000005").exists()


def test_a_fresh_run_into_old_checkpoints_refuses_before_any_work(tmp_path: Path, capsys) -> None:
    out = tmp_path / "run"
    fake_checkpoint(out / "checkpoints", 6)
    fake_checkpoint(out / "checkpoints", 8)
    (out / "checkpoints" / "latest").write_text("step_00000008")
    t0 = time.perf_counter()
    rc = main(["train", str(DEMO), "-o", f"train.output_dir={out}", "-o", "train.steps=3"])
    err = capsys.readouterr().err
    assert rc == 2
    assert time.perf_counter() - t0 < 20  # no tokenizer, no model, no warm start
    assert "already holds checkpoints of an earlier run (step_00000006, step_00000008)" in err
    assert "--resume" in err and "--overwrite" in err and "Traceback" not in err
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == [
        "latest",
        "step_00000006",
        "step_00000008",
    ]
    # --resume with --overwrite is refused too
    assert (
        main(["train", str(DEMO), "-o", f"train.output_dir={out}", "--resume", "--overwrite"]) == 2
    )
    assert "contradict" in capsys.readouterr().err


def test_overwrite_deletes_the_earlier_run(tmp_path: Path) -> None:
    out = tmp_path / "run"
    root = out / "checkpoints"
    fake_checkpoint(root, 6)
    (root / ".tmp-step_00000009").mkdir()
    (root / "latest").write_text("step_00000006")
    (out / "metrics.jsonl").write_text('{"step": 1}\n')
    (out / "notes.txt").write_text("mine")
    with pytest.raises(RunDirError, match="already holds checkpoints"):
        check_fresh_start(root, out, resume=False, overwrite=False)
    assert check_fresh_start(root, out, resume=True, overwrite=False) == []
    check_fresh_start(root, out, resume=False, overwrite=True)
    assert list(root.iterdir()) == []
    assert sorted(p.name for p in out.iterdir()) == ["checkpoints", "notes.txt"]


# ------------------------------------------------------------------ item 2: the lock
HOLDER = r"""
import sys, time
from archer_mcore.train.run_dir import RunDirLock
lock = RunDirLock(sys.argv[1]).acquire()
print("locked", flush=True)
time.sleep(120)
"""


def _holder(directory: Path) -> subprocess.Popen:
    proc = subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(directory)], stdout=subprocess.PIPE, text=True
    )
    assert proc.stdout is not None and proc.stdout.readline().strip() == "locked"
    return proc


def test_second_run_on_a_locked_directory_names_the_holder(tmp_path: Path, capsys) -> None:
    out = tmp_path / "run"
    proc = _holder(out)
    try:
        with pytest.raises(RunDirError, match=rf"in use by another archer run \(pid {proc.pid}"):
            RunDirLock(out).acquire()
        # the CLI: exit 2 with the pid, before any expensive start-up
        rc = main(["train", str(DEMO), "-o", f"train.output_dir={out}"])
        err = capsys.readouterr().err
        assert rc == 2 and f"pid {proc.pid}" in err and "Traceback" not in err
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    # The holder died without unlocking: its pid stays in the file, and the next run
    # detects that lock as stale and takes it over.
    assert (out / LOCK_NAME).read_text().strip() == str(proc.pid)
    lock = RunDirLock(out).acquire()
    try:
        assert lock.stale_pid == proc.pid
        assert (out / LOCK_NAME).read_text().strip() == str(os.getpid())
    finally:
        lock.release()
    assert "stale lock of pid" in capsys.readouterr().err
    # released: a later run takes it without any stale-lock notice
    with RunDirLock(out) as again:
        assert again.stale_pid is None


def test_the_checkpoint_dir_is_locked_too(tmp_path: Path) -> None:
    # Two runs with different output dirs but one checkpoint.dir would still clash.
    ckpt = tmp_path / "shared_ckpt"
    proc = _holder(ckpt)
    try:
        rc = main(
            [
                "train",
                str(DEMO),
                "-o",
                f"train.output_dir={tmp_path / 'b'}",
                "-o",
                f"checkpoint.dir={ckpt}",
            ]
        )
        assert rc == 2
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    # the first lock (the output dir) was released on the way out
    with RunDirLock(tmp_path / "b") as lock:
        assert lock.stale_pid is None


# ------------------------------------------------------------------ item 5: resume
def test_resume_skips_a_damaged_newest_checkpoint(tmp_path: Path) -> None:
    for s in (2, 4, 6):
        fake_checkpoint(tmp_path, s)
    (tmp_path / "latest").write_text("step_00000006")
    with open(tmp_path / "step_00000006" / "dist" / "0.distcp", "r+b") as f:
        f.write(b"X")  # same size, different bytes
    (tmp_path / "step_00000004" / "MANIFEST.json").unlink()
    skipped: list[tuple[str, str]] = []
    found = latest_valid_checkpoint(tmp_path, report=lambda p, why: skipped.append((p.name, why)))
    assert found == tmp_path / "step_00000002"
    assert [name for name, _ in skipped] == ["step_00000006", "step_00000004"]
    assert "CRC32" in skipped[0][1] and "MANIFEST.json is missing" in skipped[1][1]
    # `latest` naming a deleted step (what main's pruning left behind) is skipped too
    (tmp_path / "latest").write_text("step_00000009")
    assert latest_valid_checkpoint(tmp_path) == tmp_path / "step_00000002"
    # none valid: an error listing each, not a silent fresh start
    (tmp_path / "step_00000002" / "dist" / "0.distcp").unlink()
    with pytest.raises(CheckpointError, match="every one is damaged"):
        latest_valid_checkpoint(tmp_path)
    assert latest_valid_checkpoint(tmp_path / "nothing_here") is None


# ------------------------------------------------------------------ item 4: weights
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_parameters_finite(bad: float) -> None:
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Linear(3, 2))
    assert parameters_finite(model)
    with torch.no_grad():
        model[1].bias[1] = bad
    assert not parameters_finite(model)
