"""Multi-process tests (slow): SGLang stand-in servers as real child processes launched
by SGLangEngine.launch, the broadcast weight sync over a gloo group, a server process
that is killed mid-batch and restarted, and the real sglang-router in front of fakes."""

from __future__ import annotations

import importlib.util
import os
import sys
from collections import Counter

import httpx2
import pytest
import torch
from fake_sglang import FakeSGLangServer

from archer_mcore.rollout.http_client import ClientConfig
from archer_mcore.rollout.sglang_engine import SGLangEngine
from archer_mcore.rollout.sglang_launcher import (
    ManagedProcess,
    RouterArgs,
    SGLangServerArgs,
    build_router_command,
    free_port,
    wait_healthy,
)
from archer_mcore.rollout.sglang_protocol import WeightSyncConfig
from archer_mcore.rollout.types import SamplingParams

pytestmark = pytest.mark.slow
FAKE = (sys.executable, os.path.join(os.path.dirname(__file__), "fake_sglang.py"))
FAST = ClientConfig(max_concurrency=8, request_timeout_s=10.0, connect_timeout_s=1.0,
                    max_retries=4, backoff_s=0.05, backoff_max_s=0.2)  # fmt: skip
PROMPTS = [[5, 6, 7], [9, 10], [20, 21, 22, 23]]


def _state(url: str) -> dict:
    return httpx2.get(url + "/_test/state", timeout=10, trust_env=False).json()


def _tensor(rec: dict) -> torch.Tensor:
    return torch.tensor(rec["values"], dtype=torch.float64).view(rec["shape"])


@pytest.mark.timeout(120)
def test_broadcast_weight_sync_over_gloo_group(tmp_path):
    """Two server processes join the weight-update group as ranks 1 and 2 (as SGLang's
    TP workers do) and receive every broadcast tensor bit-exactly."""
    args = [SGLangServerArgs(model_path="fake", port=free_port()) for _ in range(2)]
    sync = WeightSyncConfig(mode="distributed", backend="gloo", device="cpu", timeout_s=60)
    engine = SGLangEngine.launch(args, tmp_path, router=None, server_launch=FAKE,
                                 weight_sync=sync, client=FAST, health_deadline_s=60)  # fmt: skip
    g = torch.Generator().manual_seed(0)
    sent = [
        [("model.embed_tokens.weight", torch.randn(64, 32, generator=g)),
         ("model.layers.0.self_attn.q_proj.weight", torch.randn(32, 32, generator=g))],
        [("model.norm.weight", torch.randn(32, generator=g).to(torch.bfloat16))],
        [],  # empty buckets are skipped
        [("lm_head.weight", torch.randn(64, 32, generator=g))],
    ]  # fmt: skip
    try:
        engine.update_weights(sent)
        second = [[("model.norm.weight", torch.ones(32, dtype=torch.bfloat16))]]
        engine.update_weights(second, version=4)
        states = [_state(a.url) for a in args]
    finally:
        engine.shutdown()
    for rank, st in enumerate(states, start=1):
        assert st["violations"] == []
        posts = [r for r in st["requests"] if r["method"] == "POST"]
        [init] = [r["body"] for r in posts if r["path"] == "/init_weights_update_group"]
        assert init["rank_offset"] == rank and init["world_size"] == 3
        assert init["backend"] == "gloo" and init["group_name"] == "weight_update_group"
        updates = [r["body"] for r in posts if r["path"] == "/update_weights_from_distributed"]
        assert [u["names"] for u in updates] == [
            ["model.embed_tokens.weight", "model.layers.0.self_attn.q_proj.weight"],
            ["model.norm.weight"], ["lm_head.weight"], ["model.norm.weight"],
        ]  # fmt: skip
        assert updates[1]["dtypes"] == ["bfloat16"] and updates[0]["shapes"] == [[64, 32], [32, 32]]
        assert [u["flush_cache"] for u in updates] == [False, False, True, True]
        assert [u["weight_version"] for u in updates] == ["1", "1", "1", "4"]
        received = st["received"]
        for name, t in [*sent[0], *sent[3]]:
            assert received[name]["dtype"] == "float32"
            assert torch.equal(_tensor(received[name]), t.double()), name
        assert received["model.norm.weight"]["dtype"] == "bfloat16"
        assert torch.equal(
            _tensor(received["model.norm.weight"]), torch.ones(32, dtype=torch.float64)
        )


@pytest.mark.timeout(120)
def test_killed_server_is_restarted_and_reloads_disk_weights(tmp_path):
    """Server 0 is a real process that exits (code 3) instead of sending its 3rd answer.
    The batch completes on server 1 with every slot filled once; the engine restarts
    server 0 and re-loads the current weights into it from the last disk checkpoint."""
    base = tmp_path / "base"
    base.mkdir()
    (base / "config.json").write_text('{"model_type": "qwen3"}')
    args = [
        SGLangServerArgs(model_path=str(base), port=free_port(),
                         extra_args=("--fake-die-after", "2", "--fake-token-delay", "0.01")),
        SGLangServerArgs(model_path=str(base), port=free_port(),
                         extra_args=("--fake-token-delay", "0.01")),
    ]  # fmt: skip
    sync = WeightSyncConfig(mode="disk", disk_dir=str(tmp_path / "sync"), base_model_dir=str(base))
    engine = SGLangEngine.launch(args, tmp_path / "logs", router=None, server_launch=FAKE,
                                 weight_sync=sync, client=FAST, health_deadline_s=60,
                                 restart_dead_servers=True)  # fmt: skip
    weights = [("model.norm.weight", torch.arange(32, dtype=torch.float32))]
    try:
        engine.update_weights([weights])
        batch = engine.generate(PROMPTS, 4, SamplingParams(max_new_tokens=4, ignore_eos=True))
        engine.wait_for_restarts(timeout_s=60)
        proc0 = engine.servers[0].process
        assert proc0 is not None and proc0.starts == 2 and proc0.alive
        st0, st1 = _state(args[0].url), _state(args[1].url)
        health = engine.health()
    finally:
        engine.shutdown()
    samples = batch.samples()
    assert Counter((s.prompt_index, s.sample_index) for s in samples) == Counter(
        {(i, j): 1 for i in range(3) for j in range(4)}
    )
    assert len({s.request_id for s in samples}) == 12
    # answers not held by a live process: exactly the 2 server 0 sent before it died
    first_life = {s.request_id for s in samples} - set(st1["served"]) - set(st0["served"])
    assert len(first_life) == 2
    # restarted server 0: fresh process, weights v1 reloaded from disk
    reload = [r["body"] for r in st0["requests"] if r["path"] == "/update_weights_from_disk"]
    assert reload == [{"model_path": str(tmp_path / "sync" / "weights_v1"), "load_format": "auto",
                       "weight_version": "1"}]  # fmt: skip
    assert torch.equal(_tensor(st0["received"]["model.norm.weight"]), torch.arange(32.0).double())
    assert health.healthy, health.detail
    assert not any(p.alive for p in [proc0, engine.servers[1].process])


@pytest.mark.timeout(180)
@pytest.mark.skipif(
    importlib.util.find_spec("sglang_router") is None, reason="sglang-router not installed"
)
def test_real_sglang_router_in_front_of_fake_workers(tmp_path):
    a, b = FakeSGLangServer().start(), FakeSGLangServer().start()
    ra = RouterArgs(worker_urls=(a.url, b.url), port=free_port(), policy="round_robin",
                    health_check_interval_secs=1)  # fmt: skip
    router = ManagedProcess(build_router_command(ra), None, tmp_path / "router.log")
    engine = None
    try:
        router.start()
        wait_healthy(ra.url, 90, router)
        engine = SGLangEngine([a.url, b.url], router_url=ra.url, router_process=router,
                              client=FAST)  # fmt: skip
        batch = engine.generate(PROMPTS, 4, SamplingParams(max_new_tokens=5, stop_token_ids=(3,)))
        health = engine.health()
        # worker a crashes: the engine's health check notices and takes it out of the
        # router, and the next batch is served by b alone
        a.die()
        after = engine.health()
        listed = httpx2.get(ra.url + "/workers", timeout=10, trust_env=False).json()["workers"]
        served_by_a = len(a.served)
        batch2 = engine.generate(PROMPTS, 2, SamplingParams(max_new_tokens=3))
    finally:
        if engine is not None:
            engine.shutdown()
        router.stop()
        a.stop()
        b.stop()
    assert a.violations == [] and b.violations == [], router.log_tail()
    # what we sent arrived unchanged (the router may add GenerateReqInput defaults)
    for r in [*a.requests, *b.requests]:
        if r["path"] == "/generate" and r["body"]["sampling_params"]["max_new_tokens"] == 5:
            body = r["body"]
            assert body["sampling_params"] == {"max_new_tokens": 5, "temperature": 1.0,
                                               "top_p": 1.0, "top_k": -1, "ignore_eos": False,
                                               "stop_token_ids": [3]}  # fmt: skip
            assert body["return_logprob"] is True and body["logprob_start_len"] == -1
    served = {**a.served, **b.served}
    assert len(served) == 18 and a.served and b.served  # batch 1 routed to both workers
    for s in batch.samples():
        assert s.token_ids == served[s.request_id]["output_ids"]
        assert s.logprobs == served[s.request_id]["logprobs"]
    assert health.healthy and any("router" in line for line in health.detail)
    assert not after.healthy and [w["url"] for w in listed] == [b.url]
    assert len(a.served) == served_by_a
    assert {s.request_id for s in batch2.samples()} <= set(b.served)
    assert len(batch2.samples()) == 6
    assert not router.alive


@pytest.mark.timeout(180)
def test_restart_under_broadcast_sync_marks_stale_then_rebuilds_group(tmp_path):
    """Broadcast path: a restarted server has base weights, so it gets no requests
    ("stale") until the next update_weights, which rebuilds the weight-update group
    (old group destroyed on the survivor, everyone re-initialised) and brings it back."""
    args = [
        SGLangServerArgs(model_path="fake", port=free_port(), extra_args=("--fake-die-after", "1")),
        SGLangServerArgs(model_path="fake", port=free_port()),
    ]  # fmt: skip
    sync = WeightSyncConfig(mode="distributed", backend="gloo", device="cpu", timeout_s=60)
    engine = SGLangEngine.launch(args, tmp_path, router=None, server_launch=FAKE,
                                 weight_sync=sync, client=FAST, health_deadline_s=60,
                                 restart_dead_servers=True)  # fmt: skip
    v1 = [[("model.norm.weight", torch.full((4,), 1.0))]]
    v2 = [[("model.norm.weight", torch.full((4,), 2.0))]]
    try:
        engine.update_weights(v1)
        engine.generate(PROMPTS, 2, SamplingParams(max_new_tokens=3, ignore_eos=True))
        engine.wait_for_restarts(timeout_s=60)
        assert engine.servers[0].stale and not engine.servers[0].dead
        assert not engine.health().healthy
        batch = engine.generate(PROMPTS, 2, SamplingParams(max_new_tokens=3, ignore_eos=True))
        assert {s.request_id for s in batch.samples()} <= set(_state(args[1].url)["served"])
        engine.update_weights(v2)
        st0, st1 = _state(args[0].url), _state(args[1].url)
        assert engine.health().healthy and not engine.servers[0].stale
    finally:
        engine.shutdown()
    # every (re)initialisation destroys the group name first (SGLang 0.5.23 fails to
    # re-create a group that exists); updates sit inside begin/end sessions
    sync_calls = ["/destroy_weights_update_group", "/init_weights_update_group",
                  "/begin_weight_update", "/update_weights_from_distributed",
                  "/end_weight_update"]  # fmt: skip
    paths1 = [r["path"] for r in st1["requests"] if r["method"] == "POST" and "weight" in r["path"]]
    assert paths1 == sync_calls * 2
    paths0 = [r["path"] for r in st0["requests"] if r["method"] == "POST" and "weight" in r["path"]]
    assert paths0 == sync_calls
    for st in (st0, st1):
        assert st["violations"] == [] and st["weight_version"] == "2"
        assert _tensor(st["received"]["model.norm.weight"]).tolist() == [2.0] * 4


@pytest.mark.timeout(120)
def test_tp_servers_get_rank_offsets_counting_earlier_tp_workers(tmp_path):
    """Servers with TP 2 and TP 1 (stand-ins whose TP workers join at rank_offset +
    tp_rank, as SGLang 0.5.23 does): TP sizes come from /server_info, the group has
    world 1 + 2 + 1 and the offsets 1 and 3; every TP worker receives every tensor.
    Counting each server as one rank (offsets 1, 2; world 3) would make ranks collide
    and the group never form."""
    args = [SGLangServerArgs(model_path="fake", port=free_port(), tp_size=2),
            SGLangServerArgs(model_path="fake", port=free_port(), tp_size=1)]  # fmt: skip
    sync = WeightSyncConfig(mode="distributed", backend="gloo", device="cpu", timeout_s=60)
    engine = SGLangEngine.launch(args, tmp_path, router=None, server_launch=FAKE,
                                 weight_sync=sync, client=FAST, health_deadline_s=60)  # fmt: skip
    t = torch.arange(12, dtype=torch.float32).view(3, 4)
    try:
        assert [s.num_gpus for s in engine.servers] == [2, 1]
        engine.update_weights([[("model.norm.weight", t)]])
        states = [_state(a.url) for a in args]
    finally:
        engine.shutdown()
    inits = [next(r["body"] for r in st["requests"] if r["path"] == "/init_weights_update_group")
             for st in states]  # fmt: skip
    assert [(i["rank_offset"], i["world_size"]) for i in inits] == [(1, 4), (3, 4)]
    assert torch.equal(_tensor(states[0]["received"]["model.norm.weight"]), t.double())
    assert states[0]["tp_sums"] == {"model.norm.weight": [66.0]}  # TP worker 1 of server 0
    assert states[1]["tp_sums"] == {}
    assert all(st["violations"] == [] for st in states)
