"""Colocated SGLang servers share the trainer's GPUs: a distributed weight sync over
NCCL would put two ranks on GPU 0 in one communicator, so the config is refused at
load, naming both keys and what to use instead (issue 21, item 3)."""

from __future__ import annotations

from pathlib import Path

import pytest

from archer_mcore.config import ConfigError, config_from_dict, load_config


def _cfg(**rollout: object) -> dict[str, object]:
    return {"rollout": {"engine": "sglang", **rollout}}


@pytest.mark.parametrize("sync", ["nccl", "distributed"])
def test_colocated_nccl_weight_sync_is_refused_at_load(tmp_path: Path, sync: str) -> None:
    path = tmp_path / "run.yaml"
    path.write_text(f"rollout:\n  engine: sglang\n  mode: colocated\n  weight_sync: {sync}\n")
    with pytest.raises(ConfigError) as err:
        load_config(path)
    msg = str(err.value)
    assert str(path) in msg
    assert f"rollout.weight_sync = {sync}" in msg and "rollout.mode = colocated" in msg
    assert "rollout.weight_sync: tensor" in msg and "rollout.weight_sync: disk" in msg
    assert "NCCL refuses" in msg and "disaggregated" in msg


def test_the_default_sync_of_a_colocated_sglang_run_is_refused_too() -> None:
    """The defaults (weight_sync distributed, sync_backend nccl) are the same group."""
    with pytest.raises(ConfigError, match="rollout.weight_sync = distributed"):
        config_from_dict(_cfg())


@pytest.mark.parametrize(
    "raw",
    [
        _cfg(mode="colocated", weight_sync="tensor"),
        _cfg(mode="colocated", weight_sync="disk"),
        # gloo: the group's traffic goes through host memory, no NCCL communicator
        _cfg(mode="colocated", weight_sync="nccl", sglang={"sync_backend": "gloo"}),
        _cfg(mode="disaggregated", weight_sync="nccl", sglang={"server_urls": ["http://h:1"]}),
        {"rollout": {"engine": "local", "mode": "colocated", "weight_sync": "nccl"}},
    ],
)
def test_other_sync_layouts_load(raw: dict[str, object]) -> None:
    config_from_dict(raw)
