"""Issue 22 items 5 and 6, issue 27 item 1 against a real SGLang 0.5.23 server (CPU, tiny
random Qwen3 saved with transformers) behind the real sglang-router 0.3.2, both started
with a per-job API key file the way the trainer starts them.

* Without the key (or with a wrong one) the server refuses /generate and every weight
  endpoint, and the router refuses /generate and /workers: HTTP 401.
* The trainer's requests pass: generation through the router, a distributed weight
  update over gloo (from a trainer whose environment looks like torchrun's, so the
  rendezvous must not go through torch's agent-store path, and the server must not
  inherit torchrun's variables) and a disk update.
* The key is in no process's command line, not in the server's log (SGLang prints its
  server_args at start) and not in the engine's copy of /server_info.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any

import httpx2
import pytest
import torch
from sglang_harness import TINY_QWEN3, RealServers

from archer_mcore.rollout.http_client import ClientConfig
from archer_mcore.rollout.sglang_engine import SGLangEngine
from archer_mcore.rollout.sglang_launcher import new_api_key, write_api_key_file
from archer_mcore.rollout.sglang_protocol import WeightSyncConfig
from archer_mcore.rollout.types import SamplingParams

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]
PROMPTS = [[5, 6, 7, 8], [20, 21]]
GREEDY = SamplingParams(temperature=0.0, max_new_tokens=6, ignore_eos=True)
TORCHRUN_LIKE = {"TORCHELASTIC_USE_AGENT_STORE": "True", "TORCHELASTIC_RUN_ID": "t",
                 "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "1", "RANK": "0",
                 "LOCAL_RANK": "0", "WORLD_SIZE": "2", "GROUP_RANK": "0"}  # fmt: skip


def _tiny_model(seed: int) -> Any:
    from transformers import Qwen3Config, Qwen3ForCausalLM

    torch.manual_seed(seed)
    cfg = {k: v for k, v in TINY_QWEN3.items() if k not in ("model_type", "architectures")}
    return Qwen3ForCausalLM(Qwen3Config(**cfg)).to(torch.float32).eval()


def _cmdlines(pgids: list[int]) -> list[str]:
    """Command lines of every live process in the given process groups."""
    out = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            if os.getpgid(int(pid)) in pgids:
                out.append(Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace"))
        except (OSError, ProcessLookupError):
            continue
    return out


def _paths_with(value: Any, needle: str, path: str = "") -> list[str]:
    """Where in a JSON value a string contains `needle` (for failure messages)."""
    if isinstance(value, dict):
        return [p for k, v in value.items() for p in _paths_with(v, needle, f"{path}.{k}")]
    if isinstance(value, list):
        return [p for i, v in enumerate(value) for p in _paths_with(v, needle, f"{path}[{i}]")]
    return [path] if needle in str(value) else []


def _refusals(server: str, router: str) -> dict[str, int]:
    """Status of each request an outsider could send, without the key and with a wrong one."""
    weight_bodies = {
        "/update_weights_from_disk": {"model_path": "/evil", "load_format": "auto"},
        "/init_weights_update_group": {"master_address": "127.0.0.1", "master_port": 9,
                                       "rank_offset": 1, "world_size": 2,
                                       "group_name": "evil", "backend": "gloo"},
        "/update_weights_from_distributed": {"names": ["x"], "dtypes": ["float32"],
                                             "shapes": [[1]]},
        "/generate": {"input_ids": [5, 6], "sampling_params": {"max_new_tokens": 1}},
    }  # fmt: skip
    out = {}
    # a connection per request: a kept-alive one the server closed while idle (uvicorn's
    # keep-alive timeout, under a busy CI machine) failed a POST with "Server
    # disconnected without sending a response", which says nothing about the key
    limits = httpx2.Limits(max_keepalive_connections=0)
    with httpx2.Client(timeout=60, trust_env=False, limits=limits) as c:
        for headers in ({}, {"Authorization": "Bearer wrong"}):
            tag = "wrong key" if headers else "no key"
            for path, body in weight_bodies.items():
                out[f"server {path} ({tag})"] = c.post(server + path, json=body,
                                                        headers=headers).status_code  # fmt: skip
            out[f"router /generate ({tag})"] = c.post(
                router + "/generate", json=weight_bodies["/generate"], headers=headers
            ).status_code
            out[f"router POST /workers ({tag})"] = c.post(
                router + "/workers", json={"url": "http://127.0.0.1:9"}, headers=headers
            ).status_code
    return out


def test_keyed_server_and_router_refuse_outsiders_and_serve_the_trainer(
    tmp_path: Path, kernel_calls: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    model_a, model_b = _tiny_model(1), _tiny_model(2)
    model_dir = tmp_path / "model"
    model_a.save_pretrained(model_dir)
    key = new_api_key()
    key_file = write_api_key_file(tmp_path / "secret" / "api_key.yaml", key)
    for k, v in TORCHRUN_LIKE.items():  # this process is "a torchrun worker"
        monkeypatch.setenv(k, v)
    rs = RealServers(tmp_path / "logs", kernel_calls)
    engine = None
    try:
        rs.start(model_dir, 1, api_key_file=str(key_file))
        router = rs.start_router(api_key_file=str(key_file))
        refused = _refusals(rs.urls[0], router)
        sync = WeightSyncConfig(mode="distributed", backend="gloo", device="cpu",
                                master_address="127.0.0.1", timeout_s=120)  # fmt: skip
        client = ClientConfig(max_concurrency=8, request_timeout_s=120.0, max_retries=1,
                              api_key=key)  # fmt: skip
        engine = SGLangEngine(rs.urls, router_url=router, client=client, weight_sync=sync)
        before = [s.token_ids for s in engine.generate(PROMPTS, 1, GREEDY).samples()]
        engine.update_weights([list(model_b.state_dict().items())], version=1)
        after_dist = [s.token_ids for s in engine.generate(PROMPTS, 1, GREEDY).samples()]
        engine.sync_cfg = dataclasses.replace(sync, mode="disk", disk_dir=str(tmp_path / "ws"),
                                              base_model_dir=str(model_dir))  # fmt: skip
        engine.update_weights([list(model_a.state_dict().items())], version=2)
        after_disk = [s.token_ids for s in engine.generate(PROMPTS, 1, GREEDY).samples()]
        with httpx2.Client(timeout=60, trust_env=False) as c:
            info = c.get(rs.urls[0] + "/model_info",
                         headers={"Authorization": f"Bearer {key}"}).json()  # fmt: skip
        cmdlines = _cmdlines([p.proc.pid for p in rs.procs if p.proc is not None])
        server_info = repr(engine.server_info)
        leaks = _paths_with(engine.server_info, key)
    finally:
        if engine is not None:
            engine.shutdown()
        rs.stop()
    assert set(refused.values()) == {401}, refused
    assert before != after_dist, "the distributed update did not change greedy output"
    assert after_disk == before, "the disk update did not restore the first weights"
    assert info["weight_version"] == "2"
    assert len(cmdlines) >= 2 and not any(key in c for c in cmdlines), cmdlines
    assert not any(key in a for p in rs.procs for a in p.argv)
    logs = {p.name: p.read_text(errors="replace") for p in (tmp_path / "logs").iterdir()}
    assert "server_args=" in logs[f"server_{rs.args[0].port}.log"]  # SGLang did print them
    assert not any(key in text for text in logs.values())
    assert key not in server_info and "<redacted>" in server_info, leaks
