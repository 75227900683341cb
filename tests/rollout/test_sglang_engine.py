"""SGLangEngine at its HTTP boundary: in-test fake servers check every request against
SGLang's documented API and answer in SGLang's format (fake_sglang.py)."""

from __future__ import annotations

import json
import threading
import time
from collections import Counter

import pytest
import torch
from fake_sglang import FakeSGLangServer

from archer_mcore.rollout.http_client import ClientConfig
from archer_mcore.rollout.sglang_engine import SGLangEngine
from archer_mcore.rollout.sglang_protocol import WeightSyncConfig
from archer_mcore.rollout.types import (
    EnginePausedError,
    RolloutEngine,
    RolloutError,
    SamplingParams,
)

PROMPTS = [[5, 6, 7], [9, 10], [20, 21, 22, 23]]
FAST = ClientConfig(max_concurrency=8, request_timeout_s=5.0, connect_timeout_s=1.0,
                    max_retries=3, backoff_s=0.01, backoff_max_s=0.05)  # fmt: skip


@pytest.fixture
def servers(request):
    made: list[FakeSGLangServer] = []

    def make(**kw) -> FakeSGLangServer:
        s = FakeSGLangServer(**kw).start()
        made.append(s)
        return s

    yield make
    for s in made:
        s.stop()


def _engine(urls, **kw) -> SGLangEngine:
    kw.setdefault("client", FAST)
    kw.setdefault("health_probe_timeout_s", 0.5)
    return SGLangEngine(urls, **kw)


def _served_by_rid(*fakes):
    out = {}
    for f in fakes:
        for rid, rec in f.served.items():
            assert rid not in out, f"rid {rid} served twice"
            out[rid] = rec
    return out


@pytest.mark.timeout(30)
def test_generate_requests_follow_api_and_replies_are_parsed(servers):
    a, b = servers(), servers()
    engine = _engine([a.url, b.url])
    try:
        assert isinstance(engine, RolloutEngine)
        params = SamplingParams(temperature=0.7, top_p=0.9, top_k=20, max_new_tokens=6,
                                stop_token_ids=(3, 4, 5))  # fmt: skip
        batch = engine.generate(PROMPTS, 4, params)
    finally:
        engine.shutdown()
    assert a.violations == [] and b.violations == []
    gen = [r["body"] for f in (a, b) for r in f.requests if r["path"] == "/generate"]
    assert len(gen) == 12 and len(a.started) == 6 and len(b.started) == 6  # round robin
    # every request as SGLang documents it (hand-written expectation)
    for body in gen:
        assert body["sampling_params"] == {
            "max_new_tokens": 6, "temperature": 0.7, "top_p": 0.9, "top_k": 20,
            "ignore_eos": False, "stop_token_ids": [3, 4, 5],
        }  # fmt: skip
        assert body["return_logprob"] is True and body["logprob_start_len"] == -1
        assert body["stream"] is False
    served = _served_by_rid(a, b)
    assert len(batch) == 3 and all(len(g) == 4 for g in batch)
    rids = set()
    for i, group in enumerate(batch):
        for j, s in enumerate(group):
            assert (s.prompt_index, s.sample_index, s.prompt_ids) == (i, j, PROMPTS[i])
            rec = served[s.request_id]
            assert s.token_ids == rec["output_ids"] and s.logprobs == rec["logprobs"]
            assert s.finish_reason == rec["finish"]["type"]
            rids.add(s.request_id)
    assert rids == set(served), "every answer used exactly once"
    req_by_rid = {body["rid"]: body for body in gen}
    for s in batch.samples():
        assert req_by_rid[s.request_id]["input_ids"] == s.prompt_ids


@pytest.mark.timeout(30)
def test_worker_dying_mid_batch_no_sample_lost_or_counted_twice(servers):
    # a answers 3 requests, then crashes instead of sending its 4th answer (closes every
    # connection, stops listening); requests are in flight on both when a dies.
    a = servers(die_after=3, token_delay_s=0.01)
    b = servers(token_delay_s=0.01)
    engine = _engine([a.url, b.url])
    try:
        batch = engine.generate(PROMPTS, 4, SamplingParams(max_new_tokens=5, ignore_eos=True))
        health = engine.health()
    finally:
        engine.shutdown()
    samples = batch.samples()
    assert len(samples) == 12
    assert Counter((s.prompt_index, s.sample_index) for s in samples) == Counter(
        {(i, j): 1 for i in range(3) for j in range(4)}
    )
    served = _served_by_rid(a, b)
    assert len(a.served) == 3, "a answered exactly 3 before dying"
    assert len(a.started) > 3, "a must have received requests it never answered"
    unanswered = set(a.started) - set(a.served)
    used = [s.request_id for s in samples]
    assert len(set(used)) == 12 and not (set(used) & unanswered)
    for s in samples:  # each sample is exactly what a server answered for its rid
        assert s.token_ids == served[s.request_id]["output_ids"]
    # a's 3 answers are kept, not regenerated; the rest came from b
    assert set(a.served) <= set(used)
    assert not health.healthy and any(a.url in line and "DOWN" in line for line in health.detail)


@pytest.mark.timeout(30)
def test_only_server_dies_step_fails_with_clear_error(servers):
    a = servers(die_after=2)
    engine = _engine([a.url])
    try:
        t0 = time.monotonic()
        with pytest.raises(RolloutError, match=r"no live SGLang server left.*" + a.url):
            engine.generate(PROMPTS, 4, SamplingParams(max_new_tokens=3))
        assert time.monotonic() - t0 < 10
    finally:
        engine.shutdown()


@pytest.mark.timeout(30)
def test_hung_server_times_out_is_aborted_and_avoided(servers):
    a = servers(hang_after=0)  # accepts connections, never answers
    b = servers()
    cfg = ClientConfig(max_concurrency=8, request_timeout_s=0.5, connect_timeout_s=0.5,
                       max_retries=3, backoff_s=0.01, backoff_max_s=0.05)  # fmt: skip
    engine = _engine([a.url, b.url], client=cfg)
    try:
        batch = engine.generate(PROMPTS[:2], 2, SamplingParams(max_new_tokens=4))
    finally:
        engine.shutdown()
    assert len(batch.samples()) == 4 and not a.served
    assert {s.request_id for s in batch.samples()} <= set(b.served)
    # each timed-out request was aborted by rid on the hung server
    aborted = {r["body"]["rid"] for r in a.requests if r["path"] == "/abort_request"}
    assert aborted == set(a.started) and aborted
    assert a.violations == [] and b.violations == []


@pytest.mark.timeout(30)
def test_pause_aborts_in_flight_then_resume(servers):
    a = servers(token_delay_s=0.02)
    engine = _engine([a.url])
    out = []
    try:
        params = SamplingParams(max_new_tokens=200, ignore_eos=True)
        worker = threading.Thread(target=lambda: out.append(engine.generate(PROMPTS, 2, params)))
        worker.start()
        time.sleep(0.3)
        engine.pause()
        worker.join(timeout=20)
        assert out and all(s.finish_reason == "abort" for s in out[0].samples())
        assert all(len(s.token_ids) < 200 for s in out[0].samples())
        with pytest.raises(EnginePausedError):
            engine.generate(PROMPTS, 1, params)
        engine.resume()
        again = engine.generate(PROMPTS, 1, SamplingParams(max_new_tokens=3, ignore_eos=True))
        assert [s.finish_reason for s in again.samples()] == ["length"] * 3
    finally:
        engine.shutdown()
    paths = [(r["path"], r["body"]) for r in a.requests if r["path"] != "/generate"]
    assert ("/pause_generation", {"mode": "abort"}) in paths
    assert ("/abort_request", {"abort_all": True}) in paths
    assert ("/continue_generation", {}) in paths
    assert a.violations == []


@pytest.mark.timeout(30)
def test_disk_weight_sync_writes_hf_checkpoint_and_requests_reload(servers, tmp_path):
    base = tmp_path / "base"
    base.mkdir()
    (base / "config.json").write_text(json.dumps({"model_type": "qwen3", "vocab_size": 64}))
    (base / "tokenizer.json").write_text("{}")
    (base / "model.safetensors").write_bytes(b"old weights: must not be copied")
    # b was started with --load-format dummy: without load_format "auto" in the request it
    # would reload random weights (SGLang 0.5.23 uses the server's own format by default)
    a, b = servers(), servers(load_format="dummy")
    sync = WeightSyncConfig(mode="disk", disk_dir=str(tmp_path / "sync"), base_model_dir=str(base))
    engine = _engine([a.url, b.url], weight_sync=sync)
    g = torch.Generator().manual_seed(0)
    sent = {
        "model.embed_tokens.weight": torch.randn(64, 32, generator=g),
        "model.norm.weight": torch.randn(32, generator=g).to(torch.bfloat16),
        "lm_head.weight": torch.randn(64, 32, generator=g),
    }
    items = list(sent.items())
    try:
        engine.update_weights([items[:2], items[2:]])
        assert engine.weight_version == 1
        ckpt = tmp_path / "sync" / "weights_v1"
        assert sorted(p.name for p in ckpt.iterdir()) == [
            "config.json", "model-00001-of-00002.safetensors",
            "model-00002-of-00002.safetensors", "model.safetensors.index.json", "tokenizer.json",
        ]  # fmt: skip
        for f in (a, b):
            assert f.violations == []
            [req] = [r["body"] for r in f.requests if r["path"] == "/update_weights_from_disk"]
            assert req == {"model_path": str(ckpt), "load_format": "auto", "weight_version": "1"}
            assert set(f.received) == set(sent)
            for k, v in sent.items():
                assert f.received[k].dtype == v.dtype and torch.equal(f.received[k], v)
        engine.update_weights([items], version=5)
        assert not ckpt.exists() and (tmp_path / "sync" / "weights_v5").is_dir()
        batch = engine.generate(PROMPTS[:1], 1, SamplingParams(max_new_tokens=2))
        assert batch[0][0].weight_version == 5  # from meta_info.weight_version
    finally:
        engine.shutdown()


@pytest.mark.timeout(30)
def test_server_refusing_disk_weights_is_an_error(servers, tmp_path):
    a = servers()
    sync = WeightSyncConfig(mode="disk", disk_dir=str(tmp_path / "sync"), base_model_dir=None)
    engine = _engine([a.url], weight_sync=sync)
    try:  # no config.json next to the weights: the fake refuses (success: false)
        with pytest.raises(RolloutError, match="refused weights"):
            engine.update_weights([[("w", torch.zeros(2))]])
        assert engine.weight_version == 0
    finally:
        engine.shutdown()


@pytest.mark.timeout(30)
def test_concurrency_is_bounded(servers):
    a = servers(token_delay_s=0.01)
    cfg = ClientConfig(max_concurrency=3, request_timeout_s=5.0, max_retries=0)
    engine = _engine([a.url], client=cfg)
    try:
        batch = engine.generate(PROMPTS, 4, SamplingParams(max_new_tokens=5, ignore_eos=True))
    finally:
        engine.shutdown()
    assert len(batch.samples()) == 12
    assert a.max_in_flight == 3  # the bound is reached and never exceeded


@pytest.mark.timeout(30)
def test_5xx_is_retried_4xx_fails_at_once(servers):
    a = servers(fail_first=2, fail_status=503)
    engine = _engine([a.url])
    try:
        batch = engine.generate(PROMPTS[:1], 1, SamplingParams(max_new_tokens=3))
        # the first two attempts got 503; the third (new rid) succeeded
        assert len(a.started) == 3 and list(a.served) == [batch[0][0].request_id]
        assert batch[0][0].request_id.endswith("-0-0-2")
    finally:
        engine.shutdown()
    b = servers(fail_first=10, fail_status=422)
    engine = _engine([b.url])
    try:
        with pytest.raises(RolloutError, match=r"sample \(0, 0\).*HTTP 422"):
            engine.generate(PROMPTS[:1], 1, SamplingParams(max_new_tokens=3))
        assert len(b.started) == 1
    finally:
        engine.shutdown()


def test_reply_parsing_rejects_inconsistent_answers():
    from archer_mcore.rollout.sglang_protocol import parse_generate_reply

    ok = {"output_ids": [4, 9], "meta_info": {"id": "r", "finish_reason": {"type": "stop", "matched": 9},
          "output_token_logprobs": [[-0.5, 4, None], [-1.5, 9, None]]}}  # fmt: skip
    s = parse_generate_reply(ok, 0, 1, [1, 2], default_version=3)
    assert (s.token_ids, s.logprobs, s.finish_reason, s.weight_version) == (
        [4, 9],
        [-0.5, -1.5],
        "stop",
        3,
    )
    no_logprobs = {
        "output_ids": [4, 9],
        "meta_info": {"finish_reason": {"type": "length", "length": 2}},
    }
    with pytest.raises(RolloutError, match="2 output ids but 0 logprobs"):
        parse_generate_reply(no_logprobs, 0, 1, [1], default_version=0)
    swapped = {"output_ids": [4, 9], "meta_info": {"finish_reason": {"type": "length", "length": 2},
               "output_token_logprobs": [[-0.5, 9, None], [-1.5, 4, None]]}}  # fmt: skip
    with pytest.raises(RolloutError, match="logprob 0 is for token 9"):
        parse_generate_reply(swapped, 0, 1, [1], default_version=0)
    weird = {
        "output_ids": [],
        "meta_info": {"finish_reason": {"type": "exploded"}, "output_token_logprobs": []},
    }
    with pytest.raises(RolloutError, match="finish_reason"):
        parse_generate_reply(weird, 0, 0, [1], default_version=0)
