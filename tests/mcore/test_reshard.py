"""Checkpoints that reshard: saved at TP=2 DP=1, resumed at TP=1 DP=2 and at PP=2, the
next optimizer steps equal those of the run that never changed layout; a checkpoint
in the format written before resharding loads at its own layout or says which to use."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import reshard_workers
import torch.multiprocessing as mp
from conftest import free_port, save_tiny_hf, tiny_hf_config

import archer_mcore.actor.checkpoint as ckpt
from archer_mcore.model.hf_config import shape_from_hf_config


def _spawn(task: str, payload: dict[str, Any], tmp: Path) -> dict[str, Any]:
    result = tmp / f"{task}_result.json"
    mp.start_processes(
        reshard_workers.entry,
        args=(2, free_port(), task, payload, str(result)),
        nprocs=2,
        join=True,
        start_method="spawn",
    )
    return json.loads(result.read_text())


@pytest.mark.slow
@pytest.mark.timeout(400)
@pytest.mark.parametrize("model_type", ["qwen3", "qwen2"])
def test_resume_at_another_layout_matches_the_unchanged_run(tmp_path, model_type):
    """qwen3 (untied output layer) and qwen2 (tied embeddings, QKV bias). Vocab 100 is
    padded to 128 at every TP, so the embedding keeps its shape across layouts."""
    hf = save_tiny_hf(model_type, tmp_path / "hf", seed=4)
    out = _spawn(
        "reshard",
        {
            "hf_dir": str(hf),
            "root": str(tmp_path / "ckpt"),
            "save_layout": [2, 1],
            "resume_layouts": [[1, 1], [1, 2], [2, 1]],
        },
        tmp_path,
    )
    assert out["moved"] > 1e-3  # training moved the weights: the comparison can fail
    manifest = json.loads((tmp_path / "ckpt" / "step_00000002" / "MANIFEST.json").read_text())
    assert (manifest["tp"], manifest["pp"], manifest["world_size"]) == (2, 1, 2)
    assert manifest["optimizer_sharding"] == "fully_reshardable"
    assert manifest["padded_vocab"] == 128
    resumed = out["resumed"]
    lr = resumed["tp2pp1"]["lr_after_load"]  # the scheduler's, at the saved layout
    assert 0 < lr < 1e-2  # past warm-up, decaying: not a fresh scheduler's 0 or peak
    assert set(resumed) == {"tp1pp1", "tp1pp2", "tp2pp1"}
    assert resumed["tp1pp1"]["dp"] == 2 and resumed["tp1pp2"]["dp"] == 1
    for name, r in resumed.items():
        assert r["loaded_diff"] == 0.0, name  # the weights as saved, exactly
        assert r["step"] == 4 and r["lr_after_load"] == lr, name
        assert r["max_abs_diff"] < 1e-5, (name, r["max_abs_diff"])
    # RNG: restored only at the saved layout, and said so otherwise.
    assert resumed["tp2pp1"]["rng_restored"] and resumed["tp2pp1"]["log"] == []
    for name in ("tp1pp1", "tp1pp2"):
        assert not resumed[name]["rng_restored"], name
        (line,) = resumed[name]["log"]
        assert "saved at world_size=2 TP=2 PP=1" in line and "RNG states are not restored" in line


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_reshard_without_the_distributed_optimizer(tmp_path):
    """parallel.use_distributed_optimizer=false: megatron's plain optimizer keeps its
    state per parameter (model space), which reshards the same way."""
    hf = save_tiny_hf("qwen3", tmp_path / "hf", seed=6)
    out = _spawn(
        "reshard",
        {
            "hf_dir": str(hf),
            "root": str(tmp_path / "ckpt"),
            "save_layout": [2, 1],
            "resume_layouts": [[1, 1]],
            "distributed_optimizer": False,
        },
        tmp_path,
    )
    assert out["moved"] > 1e-3
    r = out["resumed"]["tp1pp1"]
    assert r["dp"] == 2 and r["step"] == 4 and r["loaded_diff"] == 0.0
    assert r["max_abs_diff"] < 1e-5, r["max_abs_diff"]


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_checkpoint_in_the_previous_format(tmp_path):
    hf = save_tiny_hf("qwen3", tmp_path / "hf", seed=5)
    out = _spawn("reshard_legacy", {"hf_dir": str(hf), "root": str(tmp_path / "ckpt")}, tmp_path)
    manifest = json.loads((tmp_path / "ckpt" / "step_00000002" / "MANIFEST.json").read_text())
    assert "optimizer_sharding" not in manifest  # written as the previous version did
    assert out["same_layout_diff"] < 1e-5
    err = out["other_layout_error"]
    assert err is not None and "older format" in err
    assert "load it with world_size=2 TP=1 PP=1" in err and "this run has world_size=2 TP=2" in err


@pytest.mark.parametrize(
    ("manifest", "layout", "expected"),
    [
        # today's format: any layout, the sharding type it names
        ({"optimizer_sharding": "fully_reshardable", "padded_vocab": 128}, (4, 2, 2), None),
        # the previous format at its own layout, where 128 * TP padding equals today's
        ({}, (2, 1, 1), None),
        # ... at another layout: names the layout to use
        ({}, (2, 2, 1), "load it with world_size=2 TP=1 PP=1"),
        # ... at its own layout but padded to 128 * 2 = 256 rows, today 128
        ({"tp": 2}, (2, 2, 1), "padded to 256 rows .* pads it to 128"),
        # today's format from a model whose padded vocabulary differs
        ({"optimizer_sharding": "fully_reshardable", "padded_vocab": 256}, (2, 1, 1), "256 rows"),
    ],
)
def test_which_checkpoints_load_where(monkeypatch, manifest, layout, expected):
    """`_check_loadable` on manifests alone (vocab 100): the sharding type to load with,
    or a CheckpointError saying why not."""

    world, tp, pp = layout
    monkeypatch.setattr(ckpt, "_layout", lambda: {"world_size": world, "tp": tp, "pp": pp})
    policy = SimpleNamespace(shape=shape_from_hf_config(tiny_hf_config("qwen3")))
    saved = {"world_size": 2, "tp": 1, "pp": 1, **manifest}
    if expected is None:
        want = manifest.get("optimizer_sharding", "dp_reshardable")
        assert ckpt._check_loadable(policy, Path("step_1"), saved) == want
    else:
        with pytest.raises(ckpt.CheckpointError, match=expected):
            ckpt._check_loadable(policy, Path("step_1"), saved)
