"""The API key of launched SGLang servers and the router (issue 22 item 5).

Colocated launch through the config (`build_sglang_engine`): stand-in servers that
enforce the key as SGLang 0.5.23 does (tests/rollout/fake_sglang.py) behind the real
sglang-router 0.3.2; the real server is in tests/sglang_real/test_real_auth.py.
"""

from __future__ import annotations

import itertools
import os
import stat
import sys
import time
from pathlib import Path

import httpx2
import pytest

from archer_mcore.config import config_from_dict
from archer_mcore.rollout.http_client import ClientConfig
from archer_mcore.rollout.sglang_config import build_sglang_engine
from archer_mcore.rollout.sglang_launcher import (
    ROUTER_KEY_WRAPPER,
    RouterArgs,
    build_router_command,
    read_api_key,
    secrets_in_argv,
    write_api_key_file,
)
from archer_mcore.rollout.sglang_protocol import redact_secrets
from archer_mcore.rollout.types import SamplingParams

FAKE = [sys.executable, os.path.join(os.path.dirname(__file__), "fake_sglang.py")]
HF = {"model_type": "qwen3", "vocab_size": 64, "hidden_size": 32}


def test_key_file_is_private_and_refused_when_others_can_read_it(tmp_path: Path) -> None:
    path = write_api_key_file(tmp_path / "k" / "api_key.yaml", "abc123")
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    assert path.read_text() == "api-key: abc123\n"  # SGLang's --config YAML
    assert read_api_key(path) == "abc123"
    path.chmod(0o644)
    with pytest.raises(PermissionError, match="chmod 600"):
        read_api_key(path)


def test_router_key_stays_off_the_command_line_of_a_python_module(tmp_path: Path) -> None:
    key_file = write_api_key_file(tmp_path / "api_key.yaml", "s3cret")
    ra = RouterArgs(worker_urls=("http://127.0.0.1:1",), port=2, api_key_file=str(key_file))
    argv = build_router_command(ra, ("py", "-m", "sglang_router.launch_router"))
    assert argv[:5] == ["py", "-c", ROUTER_KEY_WRAPPER, str(key_file),
                        "sglang_router.launch_router"]  # fmt: skip
    assert not any("s3cret" in a for a in argv)
    # another launch command can only take the key as flags (docs/sglang.md says so)
    other = build_router_command(ra, ("router-bin",))
    assert other[-4:] == ["--api-key", "s3cret", "--control-plane-api-keys",
                          "archer:archer:admin:s3cret"]  # fmt: skip
    assert secrets_in_argv(argv) == ["s3cret"] == secrets_in_argv(["x", "--api-key", "s3cret"])


def test_server_info_secrets_and_client_repr_are_redacted() -> None:
    info = {"api_key": "k1", "admin_api_key": None, "tp_size": 1,
            "launch_command": "launch_server --api-key k1 --port 1",
            "internal_states": [{"api_key": "k1"}]}  # fmt: skip
    assert redact_secrets(info, ["k1"]) == {
        "api_key": "<redacted>", "admin_api_key": None, "tp_size": 1,
        "launch_command": "launch_server --api-key <redacted> --port 1",
        "internal_states": [{"api_key": "<redacted>"}]}  # fmt: skip
    assert "k1" not in repr(ClientConfig(api_key="k1"))


def _router_workers(router: str, key: str) -> list[str]:
    """Worker URLs the router lists (its control plane needs the key), waiting up to
    20 s for an asynchronous add or removal (0.3.2 answers 202 first)."""
    seen: list[str] = []
    for _ in range(100):
        r = httpx2.get(router + "/workers", headers={"Authorization": f"Bearer {key}"},
                       timeout=10, trust_env=False)  # fmt: skip
        r.raise_for_status()
        now = sorted(w["url"] for w in r.json()["workers"])
        if seen and now == seen:
            return now
        seen = now
        time.sleep(0.2)
    return seen


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_colocated_servers_and_router_require_the_key(tmp_path: Path) -> None:
    """Every launched server and the router refuse requests without the per-launch key
    (or with a wrong one); the engine's own requests (generate through the router, a
    disk weight sync, /workers) pass; the key is on no command line and in no log."""
    from archer_mcore.rollout.sglang_launcher import free_port

    raw = {
        "train": {"output_dir": str(tmp_path / "out"), "seed": 5},
        "rollout": {"engine": "sglang", "mode": "colocated", "weight_sync": "disk",
                    "sglang": {"num_servers": 2, "base_port": free_port(),
                               "router_port": free_port(), "router_policy": "round_robin",
                               "server_command": FAKE, "health_timeout_s": 60}},
    }  # fmt: skip
    eng = build_sglang_engine(config_from_dict(raw), HF, tmp_path / "work", device="cpu")
    try:
        key_file = Path(dict(itertools.pairwise(eng.servers[0].process.argv))["--config"])
        key = read_api_key(key_file)
        batch = eng.generate([[5, 6, 7], [9, 10]], 2, SamplingParams(max_new_tokens=2))
        base = tmp_path / "base"
        base.mkdir()
        (base / "config.json").write_text('{"model_type": "qwen3"}')
        eng.sync_cfg = type(eng.sync_cfg)(**{**eng.sync_cfg.__dict__, "base_model_dir": str(base)})
        import torch

        eng.update_weights([[("model.norm.weight", torch.ones(32))]], version=1)
        # router membership through its control plane (the same key, admin role)
        eng._run(eng._router_remove(eng.servers[1]))
        listed = _router_workers(eng.router_url, key)
        eng._run(eng._router_add(eng.servers[1]))
        relisted = _router_workers(eng.router_url, key)
        refused = {}
        urls = [s.url for s in eng.servers]
        with httpx2.Client(timeout=30, trust_env=False) as c:
            for url in [*urls, eng.router_url]:
                for headers in ({}, {"Authorization": "Bearer wrong"}):
                    refused[(url, "generate", bool(headers))] = c.post(
                        url + "/generate", json={"input_ids": [1], "sampling_params": {}},
                        headers=headers).status_code  # fmt: skip
            for url in urls:
                refused[(url, "disk", False)] = c.post(
                    url + "/update_weights_from_disk", json={"model_path": "/evil"}).status_code
            refused[("router", "workers", False)] = c.post(
                eng.router_url + "/workers", json={"url": "http://127.0.0.1:9"}).status_code
            assert c.get(urls[0] + "/health").status_code == 200  # probes need no key
            states = [c.get(u + "/_test/state").json() for u in urls]
        argvs = [s.process.argv for s in eng.servers] + [eng.router_process.argv]
        log_paths = [s.process.log_path for s in eng.servers] + [eng.router_process.log_path]
        infos = dict(eng.server_info)
    finally:
        eng.shutdown()
    assert len(batch.samples()) == 4
    assert set(refused.values()) == {401}, refused
    assert not any("router" in s.last_error for s in eng.servers), [s.last_error for s in eng.servers]
    assert listed == urls[:1] and sorted(relisted) == sorted(urls)
    for st in states:  # the engine's own requests all carried the key
        assert st["unauthorized"] == ["/generate", "/generate", "/update_weights_from_disk"]
        assert any(r["path"] == "/update_weights_from_disk" for r in st["requests"])
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
    assert not any(key in a for argv in argvs for a in argv)
    for p in log_paths:
        assert key not in p.read_text(errors="replace"), p
    assert key not in repr(infos)


def test_disaggregated_engine_sends_the_key_of_api_key_file(tmp_path: Path) -> None:
    """rollout.sglang.api_key_file: the engine sends that file's key (its start-up
    /server_info passes and generation works against a keyed server); empty, the same
    server refuses it (401 at start-up)."""
    from fake_sglang import FakeSGLangServer

    from archer_mcore.rollout.types import RolloutError

    key_file = write_api_key_file(tmp_path / "k" / "api_key.yaml", "k-disagg")
    srv = FakeSGLangServer(api_key="k-disagg").start()
    try:
        def cfg(key_path: str) -> object:
            return config_from_dict({
                "train": {"output_dir": str(tmp_path / "out")},
                "rollout": {"engine": "sglang", "mode": "disaggregated", "sglang": {
                    "server_urls": [srv.url], "master_address": "127.0.0.1",
                    "max_retries": 0, "api_key_file": key_path}},
            })  # fmt: skip

        eng = build_sglang_engine(cfg(str(key_file)), HF, tmp_path / "w", device="cpu")
        try:
            batch = eng.generate([[5, 6, 7]], 1, SamplingParams(max_new_tokens=2))
        finally:
            eng.shutdown()
        assert len(batch.samples()) == 1 and srv.unauthorized == []
        with pytest.raises(RolloutError, match="401"):
            build_sglang_engine(cfg(""), HF, tmp_path / "w2", device="cpu")
        assert srv.unauthorized == ["/server_info"]
    finally:
        srv.stop()


def test_output_of_a_keyed_process_reaches_its_log_redacted(tmp_path: Path) -> None:
    """SGLang prints its server_args, key included: a process launched with a key file
    (`--config FILE`) writes through a pipe that replaces the key; the log is 0600."""
    from archer_mcore.rollout.sglang_launcher import ManagedProcess

    key_file = write_api_key_file(tmp_path / "k" / "api_key.yaml", "f00dfeed" * 8)
    say = "import sys; print('server_args=' + open(sys.argv[2]).read(), flush=True)"
    proc = ManagedProcess([sys.executable, "-c", say, "--config", str(key_file)], None,
                          tmp_path / "logs" / "server.log")  # fmt: skip
    proc.start()
    assert proc.proc is not None and proc.proc.wait(60) == 0
    for _ in range(100):  # the copying thread finishes at the end of the output
        text = proc.log_path.read_text()
        if "server_args=" in text:
            break
        time.sleep(0.05)
    assert "server_args=api-key: <redacted>" in text and "f00dfeed" not in text, text
    assert stat.S_IMODE(proc.log_path.stat().st_mode) == 0o600
