"""metrics.host=auto and metrics.targets_dir: rank 0 binds its own node's address and
writes the Prometheus file_sd target naming it (the Slurm scripts use both, since
torchrun may put rank 0 on any training node). Prometheus reading such a target from a
real job is in tests/cluster/test_rehearsal.py."""

from __future__ import annotations

import json
import urllib.request
from pathlib import Path
from types import SimpleNamespace

import pytest

from archer_mcore.config import load_config
from archer_mcore.metrics.exporter import MetricsExporter, bind_host
from archer_mcore.train.preflight import check_metrics_endpoint

DEMO = Path(__file__).resolve().parents[2] / "configs" / "demo_cpu.yaml"


def _cfg(**kw: object) -> SimpleNamespace:
    base = dict(host="127.0.0.1", port=0, pushgateway="", job="archer", targets_dir="")
    return SimpleNamespace(**{**base, **kw})


def test_target_file_names_the_bound_address_and_goes_at_close(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    targets = tmp_path / "targets"
    exp = MetricsExporter.from_config(_cfg(targets_dir=str(targets)), run="r1")
    port = exp.start()
    try:
        path = targets / "4242.json"
        got = json.loads(path.read_text())
        assert got == [
            {"targets": [f"127.0.0.1:{port}"], "labels": {"run": "r1", "slurm_job_id": "4242"}}
        ]
        # the target is where /metrics answers (port 0 was a free port: the file says which)
        with urllib.request.urlopen(f"http://{got[0]['targets'][0]}/metrics", timeout=10) as r:
            assert b"archer_" in r.read()
        assert [p.name for p in targets.iterdir()] == ["4242.json"]  # no temporary left
    finally:
        exp.close()
    assert not path.exists()


def test_target_file_is_named_after_the_run_outside_slurm(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("SLURM_JOB_ID", raising=False)
    exp = MetricsExporter.from_config(_cfg(targets_dir=str(tmp_path)), run="my-run")
    exp.start()
    try:
        assert json.loads((tmp_path / "my-run.json").read_text())[0]["labels"]["run"] == "my-run"
    finally:
        exp.close()
    assert not list(tmp_path.iterdir())


def test_no_target_file_without_targets_dir(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    exp = MetricsExporter.from_config(_cfg(), run="r")
    exp.start()
    exp.close()
    assert not list(tmp_path.iterdir())


def test_auto_host_is_the_address_of_the_named_interface(monkeypatch) -> None:
    # NCCL_SOCKET_IFNAME names the cluster interface: "auto" is its address (lo here),
    # both where the exporter binds and where the preflight checks
    monkeypatch.setenv("NCCL_SOCKET_IFNAME", "lo")
    assert bind_host("auto") == "127.0.0.1"
    assert bind_host("10.1.2.3") == "10.1.2.3"
    exp = MetricsExporter.from_config(_cfg(host="auto"), run="r")
    try:
        exp.start()
        assert exp.url.startswith("http://127.0.0.1:")
    finally:
        exp.close()
    check_metrics_endpoint(load_config(DEMO, ["metrics.host=auto", "metrics.port=0"]))
