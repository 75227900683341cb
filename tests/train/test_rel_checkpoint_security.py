"""Real `archer train` runs for issue 22's checkpoint items:

1. nothing executes from a file the trainer reads: a pickled payload (one that would
   run code when unpickled) placed in any file `--resume` loads, with the manifest's
   size and CRC updated to match, is refused with a one-line CheckpointError naming the
   file, and the payload never runs (on main the RNG file's payload ran and the run went
   on normally). The manifest and ``latest`` are not pickles: a payload there makes the
   checkpoint (or the pointer) unreadable, is named and skipped, and resume goes on from
   a valid checkpoint;
4. a save that fails (disk full on a real tmpfs; EIO and EACCES injected at a write)
   ends with one line naming the path and the checkpoint that is still valid, exit code
   1, and that checkpoint still loads.
"""

from __future__ import annotations

import dataclasses
import errno
import io
import json
import os
import pickle
import shutil
import subprocess
import uuid
import zlib
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from archer_mcore.actor.checkpoint_store import latest_valid_checkpoint, verify_checkpoint

# Tiny and quick: 2 prompts x 2 samples per step, short responses.
TINY = (
    "rollout.max_new_tokens=8",
    "train.prompts_per_step=2",
    "train.mini_batch_prompts=2",
    "rollout.n_samples_per_prompt=2",
    "rewards.num_workers=1",
)


class Payload:
    """Unpickling this runs `touch MARKER` (what a tampered checkpoint would do)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):  # type: ignore[no-untyped-def]
        return (os.system, (f"touch {self.marker}",))


def _update_manifest(step_dir: Path, rels: list[str]) -> None:
    """Give the manifest the tampered files' true sizes and CRCs (so that only the
    content, not the integrity check, can stop the load)."""
    mpath = step_dir / "MANIFEST.json"
    manifest = json.loads(mpath.read_text())
    for rel in rels:
        data = (step_dir / rel).read_bytes()
        manifest["files"][rel] = [len(data), zlib.crc32(data)]
    mpath.write_text(json.dumps(manifest, indent=1, sort_keys=True))


def _torch_bytes(obj: object) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def _into_torch_file(rel: str) -> Callable[[Path, Payload], list[str]]:
    """The file's real content, plus the payload under one more key."""

    def tamper(step_dir: Path, payload: Payload) -> list[str]:
        state = torch.load(step_dir / rel, weights_only=True)
        state["note"] = payload
        torch.save(state, step_dir / rel)
        return [rel]

    return tamper


def _replace_with_pickle(rel: str) -> Callable[[Path, Payload], list[str]]:
    """The whole file replaced by a plain pickle of the payload."""

    def tamper(step_dir: Path, payload: Payload) -> list[str]:
        (step_dir / rel).write_bytes(pickle.dumps(payload))
        return [rel]

    return tamper


def _into_dcp_metadata(step_dir: Path, payload: Payload) -> list[str]:
    """torch.distributed.checkpoint's .metadata (a plain pickle) with one more field."""
    path = step_dir / "dist" / ".metadata"
    metadata = pickle.loads(path.read_bytes())
    metadata.note = payload
    path.write_bytes(pickle.dumps(metadata))
    return ["dist/.metadata"]


def _into_shard_bytes(step_dir: Path, payload: Payload) -> list[str]:
    """One of the shard file's byte objects (megatron's ShardedObjects, which DCP's
    planner unpickles) replaced by the payload, appended to the shard file and pointed
    at from .metadata."""
    from torch.distributed.checkpoint.metadata import BytesStorageMetadata

    meta_path = step_dir / "dist" / ".metadata"
    metadata = pickle.loads(meta_path.read_bytes())
    index, info = next(
        (i, s)
        for i, s in metadata.storage_data.items()
        if isinstance(metadata.state_dict_metadata[i.fqn], BytesStorageMetadata)
    )
    shard = step_dir / "dist" / info.relative_path
    blob = _torch_bytes(payload)
    offset = shard.stat().st_size
    with open(shard, "ab") as f:
        f.write(blob)
    metadata.storage_data[index] = dataclasses.replace(info, offset=offset, length=len(blob))
    meta_path.write_bytes(pickle.dumps(metadata))
    return [f"dist/{info.relative_path}", "dist/.metadata"]


# file -> (how the payload goes in, the file the error names)
REFUSED = {
    "rng": (_into_torch_file("rng/rank_00000.pt"), "rng/rank_00000.pt"),
    "rng-raw-pickle": (_replace_with_pickle("rng/rank_00000.pt"), "rng/rank_00000.pt"),
    "extra_state": (_into_torch_file("extra_state.pt"), "extra_state.pt"),
    "common.pt": (_into_torch_file("dist/common.pt"), "dist/common.pt"),
    "common.pt-raw-pickle": (_replace_with_pickle("dist/common.pt"), "dist/common.pt"),
    "dcp-metadata": (_into_dcp_metadata, "dist/.metadata"),
    "shard-bytes": (_into_shard_bytes, "dist/__0_0.distcp"),
    "metadata.json": (_replace_with_pickle("dist/metadata.json"), "dist/metadata.json"),
}


@pytest.fixture(scope="module")
def _runs_of_this_module() -> dict[str, Path]:
    return {}


@pytest.fixture
def two_checkpoints(archer, helpers, _runs_of_this_module, tmp_path_factory) -> Path:
    """Output dir of a 2-step run with a checkpoint after each step (run once for the
    module; every test tampers with its own copy)."""
    if "two" not in _runs_of_this_module:
        out = tmp_path_factory.mktemp("security") / "run"
        proc = archer.run("train", _overrides(helpers, out))
        assert proc.returncode == 0, proc.stderr[-4000:]
        _runs_of_this_module["two"] = out
    return _runs_of_this_module["two"]


def _overrides(helpers, out: Path, *more: str) -> list[str]:  # type: ignore[no-untyped-def]
    """Two steps, a checkpoint after each."""
    base = ["train.steps=2", "checkpoint.save_every=1", f"train.output_dir={out}"]
    return [*helpers.FAST, *TINY, *base, *more]


def _copy_run(src: Path, tmp_path: Path) -> tuple[Path, Path]:
    out = tmp_path / "run"
    shutil.copytree(src, out, symlinks=True)
    return out, out / "checkpoints" / "step_00000002"


def _resume(archer, helpers, out: Path):  # type: ignore[no-untyped-def]
    return archer.run("train", _overrides(helpers, out), "--resume")


@pytest.mark.slow
@pytest.mark.timeout(600)
@pytest.mark.parametrize("variant", sorted(REFUSED))
def test_a_payload_in_any_loaded_file_is_refused_and_never_runs(
    archer, helpers, two_checkpoints, tmp_path, variant
):
    out, step_dir = _copy_run(two_checkpoints, tmp_path)
    marker = tmp_path / f"pwned-{uuid.uuid4().hex}"
    tamper, named = REFUSED[variant]
    _update_manifest(step_dir, tamper(step_dir, Payload(marker)))
    verify_checkpoint(step_dir)  # sizes and CRCs agree: only the content is wrong
    proc = _resume(archer, helpers, out)
    assert not marker.exists(), f"the payload in {named} ran"
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("archer: training stopped: CheckpointError: "), last
    assert f"file {named} " in last and str(step_dir) in last, last


@pytest.mark.slow
@pytest.mark.timeout(600)
@pytest.mark.parametrize("rel", ["MANIFEST.json", "latest"])
def test_a_payload_in_the_manifest_or_latest_is_named_and_skipped(
    archer, helpers, two_checkpoints, tmp_path, rel
):
    out, step_dir = _copy_run(two_checkpoints, tmp_path)
    marker = tmp_path / f"pwned-{uuid.uuid4().hex}"
    target = step_dir / rel if rel == "MANIFEST.json" else out / "checkpoints" / rel
    target.write_bytes(pickle.dumps(Payload(marker)))
    proc = _resume(archer, helpers, out)
    assert not marker.exists()
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    skipped = [line for line in proc.stdout.splitlines() if line.startswith("--resume: skipping")]
    assert len(skipped) == 1 and rel in skipped[0], proc.stdout[-3000:]
    resumed = "step_00000001" if rel == "MANIFEST.json" else "step_00000002"
    assert f"resumed from {out / 'checkpoints' / resumed}" in proc.stdout, proc.stdout[-3000:]


# ------------------------------------------------------------------ item 4: failed saves
# Runs the CLI with writes into one checkpoint file failing with the errno in
# $FAIL_ERRNO: the n-th save ($FAIL_SAVE) fails where it writes $FAIL_FILE
# ("rng": the RNG file, through torch.save; "fsync": every fsync of that save;
# "metrics": metrics.jsonl after that save, not a checkpoint file).
FAILING_WRITE_DRIVER = r"""
import errno, os, sys
import torch
import archer_mcore.actor.checkpoint as checkpoint

code = getattr(errno, os.environ["FAIL_ERRNO"])
where = os.environ["FAIL_FILE"]
nth = int(os.environ["FAIL_SAVE"])
saves = {"n": 0}
real_save_checkpoint = checkpoint.save_checkpoint
real_torch_save = torch.save
real_fsync = os.fsync

def failing(path):
    raise OSError(code, os.strerror(code), str(path))

def save_checkpoint(*args, **kwargs):
    saves["n"] += 1
    return real_save_checkpoint(*args, **kwargs)

def torch_save(obj, f, *args, **kwargs):
    if saves["n"] == nth and where == "rng" and "/rng/" in str(f):
        failing(f)
    return real_torch_save(obj, f, *args, **kwargs)

def fsync(fd):
    if saves["n"] == nth and where == "fsync":
        failing(os.readlink(f"/proc/self/fd/{fd}"))
    return real_fsync(fd)

checkpoint.save_checkpoint = save_checkpoint
torch.save = torch_save
os.fsync = fsync

if where == "metrics":  # the step's line in metrics.jsonl, after its checkpoint
    import archer_mcore.train.components as components

    real_append = components.append_line

    def append_line(path, line):
        if saves["n"] == nth:
            failing(path)
        return real_append(path, line)

    components.append_line = append_line
from archer_mcore.cli import main
sys.exit(main(sys.argv[1:]))
"""


def _check_failed_save(proc: subprocess.CompletedProcess, root: Path, path_part: str) -> None:
    """One line naming the path and step 1's checkpoint (still valid), exit code 1."""
    assert proc.returncode == 1, proc.stderr[-4000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-4000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("archer: training stopped: CheckpointSaveError: "), last
    assert path_part in last, last
    assert f"still valid: {root / 'step_00000001'}" in last, last
    assert [ln for ln in proc.stderr.splitlines() if "archer: training stopped" in ln] == [last]
    assert latest_valid_checkpoint(root) == root / "step_00000001"
    assert (root / "latest").read_text().strip() == "step_00000001"
    assert not list(root.glob(".tmp-step_*"))  # the failed save's debris is gone


@pytest.mark.slow
@pytest.mark.timeout(600)
@pytest.mark.parametrize(("code", "where"), [("EIO", "fsync"), ("EACCES", "rng")])
def test_a_failed_save_is_one_line_and_keeps_the_last_checkpoint(
    archer, helpers, tmp_path, code, where
):
    out = tmp_path / "run"
    driver = tmp_path / "failing_driver.py"
    driver.write_text(FAILING_WRITE_DRIVER)
    cmd = archer.command("train", _overrides(helpers, out))
    cmd[1] = str(driver)
    env = {**helpers.child_env(), "FAIL_ERRNO": code, "FAIL_FILE": where, "FAIL_SAVE": "2"}
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=500)
    _check_failed_save(proc, out / "checkpoints", ".tmp-step_00000002")
    assert os.strerror(getattr(errno, code)) in proc.stderr.splitlines()[-1]


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_a_full_disk_under_metrics_jsonl_is_one_line(archer, helpers, tmp_path):
    out = tmp_path / "run"
    driver = tmp_path / "failing_driver.py"
    driver.write_text(FAILING_WRITE_DRIVER)
    cmd = archer.command("train", _overrides(helpers, out))
    cmd[1] = str(driver)
    env = {**helpers.child_env(), "FAIL_ERRNO": "ENOSPC", "FAIL_FILE": "metrics", "FAIL_SAVE": "2"}
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=500)
    assert proc.returncode == 1, proc.stderr[-4000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-4000:]
    last = proc.stderr.strip().splitlines()[-1]
    root = out / "checkpoints"
    assert last.startswith(
        f"archer: training stopped: OSError: writing {out / 'metrics.jsonl'}: [Errno 28] "
    ), last
    assert f"still valid: {root / 'step_00000002'}" in last, last


@pytest.fixture
def tiny_tmpfs(tmp_path: Path):  # type: ignore[no-untyped-def]
    """A 3 MiB tmpfs (room for one tiny checkpoint, not two); skipped where mounting is
    not allowed (not root, or no CAP_SYS_ADMIN)."""
    mnt = tmp_path / "tmpfs"
    mnt.mkdir()
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=3m", "tmpfs", str(mnt)], capture_output=True
    )
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.decode().strip()}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_disk_full_during_a_save_is_one_line_and_keeps_the_last_checkpoint(
    archer, helpers, tmp_path, tiny_tmpfs
):
    out = tmp_path / "run"
    root = tiny_tmpfs / "ckpt"
    proc = archer.run("train", _overrides(helpers, out, f"checkpoint.dir={root}"))
    _check_failed_save(proc, root, str(root / ".tmp-step_00000002"))
    assert "no space left on device" in proc.stderr.splitlines()[-1].lower()
