"""Checkpoint/resume: a run killed mid-save resumes to bit-identical weights; a
corrupt or partial checkpoint is a clear error."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from conftest import save_tiny_hf, spawn
from safetensors.torch import load_file

from archer_mcore.actor.checkpoint_store import (
    MANIFEST,
    CheckpointError,
    find_latest_checkpoint,
    resolve_checkpoint,
    verify_checkpoint,
)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """One uninterrupted 4-step run and one killed while publishing step 3's checkpoint,
    then resumed to step 4 (DP=2 with the distributed optimizer: sharded Adam state)."""
    tmp = tmp_path_factory.mktemp("resume")
    hf = save_tiny_hf("qwen3", tmp / "hf", seed=9)
    base = {"hf_dir": str(hf), "tp": 1, "pp": 1}
    crashed_root = tmp / "crash"
    with pytest.raises(Exception, match="SIGKILL|signal"):
        spawn(
            "full_then_crash",
            2,
            {
                **base,
                "crash_during_save_of": 3,
                "full_root": str(tmp / "full"),
                "full_weights": str(tmp / "full.safetensors"),
                "full_result": str(tmp / "full.json"),
                "crash_root": str(crashed_root),
            },
            tmp,
        )
    full = json.loads((tmp / "full.json").read_text())
    after_crash = sorted(p.name for p in crashed_root.iterdir())
    resumed = spawn(
        "resume",
        2,
        {
            **base,
            "mode": "resume",
            "ckpt_root": str(crashed_root),
            "weights_out": str(tmp / "resumed.safetensors"),
        },
        tmp,
    )
    return {"tmp": tmp, "full": full, "resumed": resumed, "after_crash": after_crash}


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_killed_run_resumes_to_identical_weights(runs):
    # The kill left step 3 unpublished: only .tmp-step_00000003 beside steps 1 and 2.
    assert runs["after_crash"] == [".tmp-step_00000003", "latest", "step_00000001", "step_00000002"]
    assert (
        runs["resumed"]["started_at"] == 2
        and runs["resumed"]["step"] == 4
        and runs["full"]["step"] == 4
    )
    a, b = load_file(runs["full"]["weights"]), load_file(runs["resumed"]["weights"])
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    # And training did move the weights (the comparison is not trivially true).
    first = load_file(str(runs["tmp"] / "hf" / "model.safetensors"))
    assert not torch.equal(
        first["model.layers.0.mlp.up_proj.weight"], a["model.layers.0.mlp.up_proj.weight"]
    )


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_keep_last_and_corruptions_are_clear_errors(runs, tmp_path):
    full_root = runs["tmp"] / "full"
    assert sorted(p.name for p in full_root.iterdir()) == [
        "latest",
        "step_00000003",
        "step_00000004",
    ]
    good = find_latest_checkpoint(full_root)
    assert good is not None and good.name == "step_00000004"
    manifest = verify_checkpoint(good)
    assert manifest["step"] == 4 and manifest["world_size"] == 2

    def copy(name: str):
        d = tmp_path / name / good.name
        shutil.copytree(good, d)
        return d, json.loads((d / MANIFEST).read_text())["files"]

    d, _ = copy("no_manifest")
    (d / MANIFEST).unlink()
    with pytest.raises(CheckpointError, match="incomplete"):
        verify_checkpoint(d)

    d, files = copy("truncated")
    victim = next(f for f in sorted(files) if f.startswith("dist/") and f.endswith(".distcp"))
    with open(d / victim, "r+b") as f:
        f.truncate(files[victim][0] // 2)
    with pytest.raises(CheckpointError, match="bytes"):
        verify_checkpoint(d)

    d, files = copy("flipped")
    with open(d / victim, "r+b") as f:
        f.seek(files[victim][0] // 2)
        byte = f.read(1)
        f.seek(-1, 1)
        f.write(bytes([byte[0] ^ 0xFF]))
    with pytest.raises(CheckpointError, match="CRC32"):
        verify_checkpoint(d)

    d, _ = copy("missing_rank")
    (d / "rng" / "rank_00001.pt").unlink()
    with pytest.raises(CheckpointError, match="rank_00001.pt is missing"):
        verify_checkpoint(d)

    unfinished = tmp_path / "root" / ".tmp-step_00000009"
    shutil.copytree(good, unfinished)  # even with a manifest, a .tmp- dir never loads
    with pytest.raises(CheckpointError, match="unfinished"):
        verify_checkpoint(unfinished)

    # A root: the latest checkpoint is what loads, and a damaged latest is an error,
    # not a fall-back to an older checkpoint or a fresh start.
    root = tmp_path / "root"
    with pytest.raises(CheckpointError, match="no checkpoint"):
        resolve_checkpoint(root)
    shutil.copytree(good, root / "step_00000003")
    shutil.copytree(good, root / "step_00000004")
    (root / "latest").write_text("step_00000004")
    assert resolve_checkpoint(root)[0].name == "step_00000004"
    (root / "step_00000004" / "extra_state.pt").unlink()
    with pytest.raises(CheckpointError, match="extra_state.pt is missing"):
        resolve_checkpoint(root)
