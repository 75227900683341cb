"""The run directory is not a way into other files (issue 22, items 2 and 3).

Item 2: a checkpoint reference resolves inside the checkpoint root. The ``latest``
pointer may only name a step directory of its root (not ``/etc``, ``../..`` or a
checkpoint elsewhere), a step directory that is a link out of the root is skipped, and
a manifest cannot point its files outside the step directory. A step directory the user
names explicitly (``archer eval --checkpoint DIR``) loads wherever it is.

Item 3: links are never written through. A symlink (or hard link) planted as the run
lock, ``metrics.jsonl``, ``latest.tmp`` or an unfinished ``.tmp-step_*`` directory leaves
the file it points at untouched: the trainer refuses it with a one-line error naming it
(or, for a directory it would delete, removes the link itself); ``--overwrite`` on a tree
holding links removes the links, never their targets, and raises no traceback.

Checkpoints here are the hand-made step directories of test_rel_run_dir.py (a manifest
in the documented format); the real trainer runs with the same links planted are in
tests/train/test_rel_checkpoint_security.py."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import zlib
from pathlib import Path
from types import SimpleNamespace

import pytest
from test_rel_run_dir import DEMO, REPO, fake_checkpoint

from archer_mcore.actor.checkpoint_store import (
    CheckpointError,
    _prune,
    _write_atomic,
    latest_valid_checkpoint,
    resolve_checkpoint,
    verify_checkpoint,
)
from archer_mcore.train.components import Components
from archer_mcore.train.progress import PhaseTimer
from archer_mcore.train.run_dir import LOCK_NAME, RunDirError, RunDirLock, check_fresh_start

PRECIOUS = "precious: must survive\n"


def _victim(tmp_path: Path, name: str = "victim.txt") -> Path:
    """A file outside the run directory that a planted link points at."""
    victim = tmp_path / "elsewhere" / name
    victim.parent.mkdir(parents=True, exist_ok=True)
    victim.write_text(PRECIOUS)
    return victim


def _skips(root: Path) -> tuple[Path | None, list[tuple[str, str]]]:
    skipped: list[tuple[str, str]] = []
    found = latest_valid_checkpoint(root, report=lambda p, why: skipped.append((p.name, why)))
    return found, skipped


# ------------------------------------------------------------------ item 2: references
@pytest.mark.parametrize(
    "pointer",
    [
        "../outside/step_00000005",
        "{outside}/step_00000005",  # absolute
        "step_00000002/../../outside/step_00000005",
        "/etc",
        "../../..",
        "..",
        "",  # empty: no pointer, the step directories are scanned
    ],
)
def test_latest_cannot_name_a_checkpoint_outside_the_root(tmp_path: Path, pointer: str) -> None:
    root, outside = tmp_path / "ckpt", tmp_path / "outside"
    fake_checkpoint(root, 2)
    fake_checkpoint(outside, 5)  # valid, and newer: main followed `latest` to it
    (root / "latest").write_text(pointer.format(outside=outside))
    found, skipped = _skips(root)
    assert found == root / "step_00000002"
    if pointer:
        assert [name for name, _ in skipped] == ["latest"]
        assert "inside" in skipped[0][1] and str(root / "latest") in skipped[0][1]
        with pytest.raises(CheckpointError, match="latest"):
            resolve_checkpoint(root)  # `archer eval --checkpoint ROOT`
    else:
        assert skipped == [] and resolve_checkpoint(root)[0] == root / "step_00000002"


def test_a_step_directory_linked_out_of_the_root_is_skipped(tmp_path: Path) -> None:
    root, outside = tmp_path / "ckpt", tmp_path / "outside"
    fake_checkpoint(root, 2)
    target = fake_checkpoint(outside, 5)
    (root / "step_00000009").symlink_to(target, target_is_directory=True)
    found, skipped = _skips(root)
    assert found == root / "step_00000002"
    assert [name for name, _ in skipped] == ["step_00000009"]
    assert "outside" in skipped[0][1]
    (root / "latest").write_text("step_00000009")  # and `latest` naming that link
    assert _skips(root)[0] == root / "step_00000002"
    with pytest.raises(CheckpointError, match="outside the checkpoint root"):
        resolve_checkpoint(root)
    # A step directory the user names explicitly loads wherever it lies.
    assert resolve_checkpoint(target)[0] == target


def test_a_manifest_cannot_point_outside_its_step_directory(tmp_path: Path) -> None:
    secret = _victim(tmp_path, "secret.bin")
    data = secret.read_bytes()
    for i, rel in enumerate(("../../elsewhere/secret.bin", str(secret))):
        d = fake_checkpoint(tmp_path / f"r{i}", 3)
        manifest = json.loads((d / "MANIFEST.json").read_text())
        manifest["files"][rel] = [len(data), zlib.crc32(data)]
        (d / "MANIFEST.json").write_text(json.dumps(manifest))
        with pytest.raises(CheckpointError, match="outside"):
            verify_checkpoint(d)
    # A file of the step directory that is a link to a file elsewhere is refused too.
    d = fake_checkpoint(tmp_path / "r2", 3)
    (d / "dist" / "0.distcp").unlink()
    (d / "dist" / "0.distcp").symlink_to(secret)
    manifest = json.loads((d / "MANIFEST.json").read_text())
    manifest["files"]["dist/0.distcp"] = [len(data), zlib.crc32(data)]
    (d / "MANIFEST.json").write_text(json.dumps(manifest))
    with pytest.raises(CheckpointError, match="symbolic link"):
        verify_checkpoint(d)


# ------------------------------------------------------------------ item 3: links
def test_the_run_lock_is_never_taken_through_a_link(tmp_path: Path) -> None:
    out = tmp_path / "run"
    out.mkdir()
    victim = _victim(tmp_path)
    (out / LOCK_NAME).symlink_to(victim)
    with pytest.raises(RunDirError, match=rf"{LOCK_NAME} is a symbolic link \(to {victim}\)"):
        RunDirLock(out).acquire()
    assert victim.read_text() == PRECIOUS
    (out / LOCK_NAME).unlink()
    os.link(victim, out / LOCK_NAME)  # a hard link: the same file under a second name
    with pytest.raises(RunDirError, match="hard link"):
        RunDirLock(out).acquire()
    assert victim.read_text() == PRECIOUS


def test_latest_tmp_is_never_written_through_a_link(tmp_path: Path) -> None:
    root = fake_checkpoint(tmp_path / "ckpt", 2).parent
    victim = _victim(tmp_path)
    (root / "latest.tmp").symlink_to(victim)
    with pytest.raises(RuntimeError, match="latest.tmp is a symbolic link"):
        _write_atomic(root / "latest", "step_00000002")
    assert victim.read_text() == PRECIOUS
    # a leftover regular latest.tmp (a crash mid-write) is simply replaced
    (root / "latest.tmp").unlink()
    (root / "latest.tmp").write_text("half")
    _write_atomic(root / "latest", "step_00000002")
    assert (root / "latest").read_text() == "step_00000002"
    assert not (root / "latest.tmp").exists()
    # `latest` itself a link: the pointer is replaced, the file it pointed at is not
    (root / "latest").unlink()
    (root / "latest").symlink_to(victim)
    _write_atomic(root / "latest", "step_00000002")
    assert not (root / "latest").is_symlink() and victim.read_text() == PRECIOUS


def test_metrics_jsonl_is_never_appended_through_a_link(tmp_path: Path) -> None:
    out = tmp_path / "run"
    out.mkdir()
    victim = _victim(tmp_path)
    (out / "metrics.jsonl").symlink_to(victim)
    cfg = SimpleNamespace(train=SimpleNamespace(output_dir=str(out), steps=3, log_every=100))
    fake = SimpleNamespace(cfg=cfg, history=[], is_main=True, exporter=None)
    with pytest.raises(RuntimeError, match="metrics.jsonl is a symbolic link"):
        Components.report(fake, 1, {"reward": 0.5}, PhaseTimer())  # type: ignore[arg-type]
    assert victim.read_text() == PRECIOUS
    (out / "metrics.jsonl").unlink()
    Components.report(fake, 1, {"reward": 0.5}, PhaseTimer())  # type: ignore[arg-type]
    assert json.loads((out / "metrics.jsonl").read_text())["reward"] == 0.5


def _linked_tree(tmp_path: Path) -> tuple[Path, Path, list[Path]]:
    """A run directory whose checkpoint root holds links to files and directories
    elsewhere; returns (output dir, checkpoint root, the link targets)."""
    out = tmp_path / "run"
    root = out / "checkpoints"
    fake_checkpoint(root, 6)
    file_victim = _victim(tmp_path)
    dir_victim = tmp_path / "elsewhere" / "data"
    (dir_victim / "dist").mkdir(parents=True)
    (dir_victim / "dist" / "keep.bin").write_text(PRECIOUS)
    (root / "step_00000006" / "link_in_step").symlink_to(file_victim)
    (root / "step_00000008").symlink_to(dir_victim, target_is_directory=True)
    (root / ".tmp-step_00000009").symlink_to(dir_victim, target_is_directory=True)
    (root / "step_00000010").symlink_to(tmp_path / "dangling")
    (root / "latest").symlink_to(file_victim)
    (root / "latest.tmp").symlink_to(file_victim)
    (out / "metrics.jsonl").symlink_to(file_victim)
    return out, root, [file_victim, dir_victim / "dist" / "keep.bin"]


def test_overwrite_removes_links_never_their_targets(tmp_path: Path) -> None:
    out, root, victims = _linked_tree(tmp_path)
    check_fresh_start(root, out, resume=False, overwrite=True)
    assert list(root.iterdir()) == []
    assert sorted(p.name for p in out.iterdir()) == ["checkpoints"]
    for v in victims:
        assert v.read_text() == PRECIOUS


def test_prune_removes_a_linked_step_directory_not_its_target(tmp_path: Path) -> None:
    _, root, victims = _linked_tree(tmp_path)
    fake_checkpoint(root, 11)
    _prune(root, 1, root / "step_00000011")
    assert sorted(p.name for p in root.iterdir()) == ["latest", "latest.tmp", "step_00000011"]
    for v in victims:
        assert v.read_text() == PRECIOUS


def _archer_train(out: Path, *extra: str, timeout: float = 300) -> subprocess.CompletedProcess:
    """`archer train` on the demo config, tiny, in a subprocess (as a user runs it)."""
    overrides = [
        f"train.output_dir={out}",
        f"warmstart.cache_dir={out.parent / 'cache'}",
        "warmstart.steps=1",
        "warmstart.examples=16",
        "data.synthetic_train_size=64",
        "data.synthetic_eval_size=8",
        "train.steps=1",
        "train.prompts_per_step=2",
        "train.mini_batch_prompts=2",
        "rollout.n_samples_per_prompt=2",
        "rollout.max_new_tokens=8",
        "eval.every=0",
        "checkpoint.save_every=1",
        "rewards.num_workers=1",
    ]
    cmd = [sys.executable, "-m", "archer_mcore.cli", "train", str(DEMO)]
    for o in overrides:
        cmd += ["-o", o]
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1"}
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(var, None)
    return subprocess.run(
        [*cmd, *extra], cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout
    )


@pytest.mark.timeout(600)
@pytest.mark.parametrize(
    "planted",
    ["metrics.jsonl", f"{LOCK_NAME}", "checkpoints/latest.tmp", "eval"],
)
def test_archer_train_refuses_planted_links_before_any_work(tmp_path: Path, planted: str) -> None:
    out = tmp_path / "run"
    victim = _victim(tmp_path)
    link = out / planted
    link.parent.mkdir(parents=True, exist_ok=True)
    if planted == "eval":
        link.symlink_to(victim.parent, target_is_directory=True)
    else:
        link.symlink_to(victim)
    proc = _archer_train(out)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert f"{link} is a symbolic link" in proc.stderr and "Traceback" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert victim.read_text() == PRECIOUS and sorted(os.listdir(victim.parent)) == ["victim.txt"]


def test_archer_eval_never_writes_its_result_through_a_link(tmp_path: Path) -> None:
    from archer_mcore.cli.eval import _write_result
    from archer_mcore.config import ConfigError

    out = tmp_path / "run"
    out.mkdir()
    victim = _victim(tmp_path)
    cfg = SimpleNamespace(train=SimpleNamespace(output_dir=str(out)))
    (out / "eval").symlink_to(victim.parent, target_is_directory=True)
    with pytest.raises(ConfigError, match="eval is a symbolic link"):
        _write_result(cfg, None, "{}\n")  # type: ignore[arg-type]
    assert sorted(os.listdir(victim.parent)) == ["victim.txt"]
    # --out naming a link: the link is replaced by the result, its target untouched
    (out / "eval").unlink()
    link = out / "result.json"
    link.symlink_to(victim)
    assert _write_result(cfg, str(link), "{}\n") == link  # type: ignore[arg-type]
    assert not link.is_symlink() and link.read_text() == "{}\n"
    assert victim.read_text() == PRECIOUS
    assert _write_result(cfg, None, "{}\n") == out / "eval" / "eval.json"  # type: ignore[arg-type]
