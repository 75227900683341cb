"""Every rollout / rollout.sglang setting changes what the SGLang engine does: shown
against in-test stand-in servers (fake_sglang.py, SGLang 0.5.23 behaviour) here; the
real servers are in tests/sglang_real/."""

from __future__ import annotations

import itertools
import os
import sys
import time

import pytest
from fake_sglang import FakeSGLangServer

from archer_mcore.config import ConfigError, config_from_dict
from archer_mcore.rollout.sglang_config import (
    SGLangConfigError,
    build_sglang_engine,
    resolve_master_address,
    sync_config,
)
from archer_mcore.rollout.sglang_engine import SGLangEngine
from archer_mcore.rollout.sglang_protocol import (
    check_server_version,
    parse_version,
    rank_layout,
)
from archer_mcore.rollout.types import RolloutError, SamplingParams

PROMPTS = [[5, 6, 7], [9, 10]]
HF = {"model_type": "qwen3", "vocab_size": 64, "hidden_size": 32}


@pytest.fixture
def fakes():
    made: list[FakeSGLangServer] = []

    def make(**kw) -> FakeSGLangServer:
        s = FakeSGLangServer(**kw).start()
        made.append(s)
        return s

    yield make
    for s in made:
        s.stop()


def _cfg(tmp_path, urls, **sglang):
    rollout = sglang.pop("rollout", {})
    raw = {
        "train": {"output_dir": str(tmp_path / "out")},
        "rollout": {"engine": "sglang", "mode": "disaggregated", **rollout,
                    "sglang": {"server_urls": list(urls), "master_address": "127.0.0.1",
                               "dtype": "bfloat16", "max_retries": 0, **sglang}},
    }  # fmt: skip
    return config_from_dict(raw)


def _build(tmp_path, urls, **kw) -> SGLangEngine:
    return build_sglang_engine(_cfg(tmp_path, urls, **kw), HF, tmp_path / "work", device="cpu")


# ----------------------------------------------------------------- pure rules
def test_rank_layout_counts_tp_workers_of_earlier_servers():
    # SGLang places TP worker k of a server at rank_offset + k; the trainer is rank 0
    assert rank_layout([1, 1]) == (3, [1, 2])
    assert rank_layout([2, 4, 1]) == (8, [1, 3, 7])
    with pytest.raises(ValueError, match="TP sizes"):
        rank_layout([1, 0])


def test_version_range_is_checked():
    assert parse_version("0.5.23") == (0, 5, 23) and parse_version("0.5.21rc1") == (0, 5, 21)
    check_server_version("u", "0.5.23")
    check_server_version("u", "0.5.21")
    for bad in ("0.5.20", "0.5.2", "0.6.0", ""):
        with pytest.raises(RolloutError, match="speaks the weight-update protocol of 0.5.21 to"):
            check_server_version("http://s:1", bad)


def test_master_address_is_found_on_this_host_and_refuses_loopback_for_remote_servers():
    local = ["http://127.0.0.1:30000"]
    remote = ["http://10.1.2.3:30000"]
    # the job's MASTER_ADDR is the rendezvous host, a guess at rank 0's: never used
    guessed = {"MASTER_ADDR": "203.0.113.9"}
    assert resolve_master_address("", local, env={**guessed, "NCCL_SOCKET_IFNAME": "lo"}) == (
        "127.0.0.1"
    )
    assert resolve_master_address("", local, env={"GLOO_SOCKET_IFNAME": "=lo"}) == "127.0.0.1"
    assert resolve_master_address("", local, env=guessed) == "127.0.0.1"  # route to the server
    # NCCL's exclusion form names no interface: the route decides
    assert resolve_master_address("", local, env={"NCCL_SOCKET_IFNAME": "^docker0"}) == (
        "127.0.0.1"
    )
    assert resolve_master_address("10.0.0.5", remote, env={}) == "10.0.0.5"
    with pytest.raises(SGLangConfigError, match="NCCL_SOCKET_IFNAME='nosuch9' names no interface"):
        resolve_master_address("", local, env={"NCCL_SOCKET_IFNAME": "nosuch9"})
    with pytest.raises(SGLangConfigError, match="rollout.sglang.master_address.*10.1.2.3"):
        resolve_master_address("", remote, env={"NCCL_SOCKET_IFNAME": "lo"})
    with pytest.raises(SGLangConfigError, match="loopback"):
        resolve_master_address("localhost", remote, env={})


def test_weight_sync_and_backend_keys_select_the_sync(tmp_path):
    for value, mode in (("distributed", "distributed"), ("nccl", "distributed"),
                        ("disk", "disk")):  # fmt: skip
        cfg = _cfg(tmp_path, ["http://127.0.0.1:1"], rollout={"weight_sync": value},
                   sync_backend="gloo", sync_timeout_s=7.0)  # fmt: skip
        sc = sync_config(cfg.rollout, "out", base_model_dir=None, master_address="a", device="cuda")
        assert (sc.mode, sc.backend, sc.device, sc.timeout_s) == (mode, "gloo", "cpu", 7.0)
    cfg = _cfg(tmp_path, ["http://127.0.0.1:1"], rollout={"fp8": True})
    assert sync_config(
        cfg.rollout, "out", base_model_dir=None, master_address="a", device="cuda"
    ).fp8


def test_config_refuses_dp_servers_and_bad_combinations(tmp_path):
    with pytest.raises(ConfigError, match="dp_size > 1"):
        _cfg(tmp_path, ["http://127.0.0.1:1"], extra_server_args=["--dp-size", "2"])
    with pytest.raises(ConfigError, match="server_tp_sizes has 1 entries for 2"):
        _cfg(tmp_path, ["http://127.0.0.1:1", "http://127.0.0.1:2"], server_tp_sizes=[2])
    with pytest.raises(ConfigError, match="tensor.*colocated"):
        _cfg(tmp_path, ["http://127.0.0.1:1"], rollout={"weight_sync": "tensor"})


# ----------------------------------------------------------------- start-up checks
@pytest.mark.timeout(30)
def test_server_checks_version_dp_dtype_mem_fraction_and_tp(fakes, tmp_path):
    ok = fakes()
    assert [s.num_gpus for s in _build(tmp_path, [ok.url]).servers] == [1]
    tp2 = fakes(tp_size=2)
    eng = _build(tmp_path, [ok.url, tp2.url])
    try:  # TP sizes from /server_info
        assert [s.num_gpus for s in eng.servers] == [1, 2]
    finally:
        eng.shutdown()
    with pytest.raises(RolloutError, match="tp_size 2"):  # config and server disagree
        _build(tmp_path, [tp2.url], server_tp_sizes=[4])
    cases = [
        (fakes(version="0.5.20"), {}, "version '0.5.20'"),
        (fakes(dp_size=2), {}, "--dp-size 2.*dp_size > 1"),
        (fakes(dtype="float16"), {}, "dtype = 'float16' but rollout.sglang.dtype = 'bfloat16'"),
        (ok, {"mem_fraction_static": 0.6}, "rollout.sglang.mem_fraction_static = 0.6"),
    ]
    for fake, kw, msg in cases:
        with pytest.raises(RolloutError, match=msg):
            _build(tmp_path, [fake.url], **kw)


# ----------------------------------------------------------------- client limits
@pytest.mark.timeout(30)
def test_max_concurrency_bounds_requests_in_flight(fakes, tmp_path):
    a = fakes(token_delay_s=0.02)
    eng = _build(tmp_path, [a.url], max_concurrency=2)
    try:
        eng.generate(PROMPTS, 4, SamplingParams(max_new_tokens=5, ignore_eos=True))
    finally:
        eng.shutdown()
    assert a.max_in_flight == 2


@pytest.mark.timeout(30)
def test_request_timeout_bounds_a_hung_request(fakes, tmp_path):
    hung = fakes(hang_after=0)
    eng = _build(tmp_path, [hung.url], request_timeout_s=0.4, max_retries=2)
    t0 = time.monotonic()
    try:
        with pytest.raises(RolloutError, match="no live SGLang server.*timed out"):
            eng.generate(PROMPTS[:1], 1, SamplingParams(max_new_tokens=2))
    finally:
        eng.shutdown()
    # the request timed out after 0.4 s, the health probe after 0.4 s more: server dead
    assert 0.8 <= time.monotonic() - t0 < 10
    assert len(hung.started) == 1


@pytest.mark.timeout(30)
@pytest.mark.parametrize("max_retries", [0, 2])
def test_max_retries_is_the_number_of_extra_attempts(fakes, tmp_path, max_retries):
    flaky = fakes(fail_first=10, fail_status=503)  # healthy, but /generate answers 503
    eng = _build(tmp_path, [flaky.url], max_retries=max_retries)
    try:
        with pytest.raises(RolloutError, match=f"failed after {max_retries + 1} attempts"):
            eng.generate(PROMPTS[:1], 1, SamplingParams(max_new_tokens=2))
    finally:
        eng.shutdown()
    assert len(flaky.started) == max_retries + 1


@pytest.mark.timeout(30)
def test_router_url_receives_generation_and_aborts_go_to_workers(fakes, tmp_path):
    w1, w2 = fakes(), fakes()
    router = fakes()  # stands for the router: it answers /generate
    eng = _build(tmp_path, [w1.url, w2.url], router_url=router.url)
    try:
        eng.generate(PROMPTS, 2, SamplingParams(max_new_tokens=3))
        eng.abort()
    finally:
        eng.shutdown()
    assert len(router.served) == 4 and not w1.served and not w2.served
    # sglang-router 0.3.2 has no /abort_request: aborts go to each worker
    assert not [r for r in router.requests if r["path"] == "/abort_request"]
    for w in (w1, w2):
        assert [r["body"] for r in w.requests if r["path"] == "/abort_request"] == [
            {"abort_all": True}
        ]


@pytest.mark.timeout(30)
def test_health_is_not_probed_during_a_sync(fakes, tmp_path):
    a = fakes()
    eng = _build(tmp_path, [a.url])
    try:
        eng._syncing = True
        assert eng.health().detail == ("weight sync in progress: not probed",)
        eng._syncing = False
        assert eng.health().healthy
    finally:
        eng.shutdown()
    assert [r["path"] for r in a.requests if r["method"] == "GET"].count("/health_generate") == 1


# ----------------------------------------------------------------- colocated launch
@pytest.mark.timeout(120)
@pytest.mark.slow
def test_colocated_launch_applies_server_and_router_settings(tmp_path):
    """Colocated mode launches num_servers servers with the configured flags (here the
    stand-in server program, which records its argv) and the real router with the
    configured policy."""
    fake = [sys.executable, os.path.join(os.path.dirname(__file__), "fake_sglang.py")]
    from archer_mcore.rollout.sglang_launcher import free_port

    raw = {
        "train": {"output_dir": str(tmp_path / "out"), "seed": 5},
        "rollout": {"engine": "sglang", "mode": "colocated", "weight_sync": "disk",
                    "sglang": {"num_servers": 2, "tp_size": 1, "dtype": "float16",
                               "mem_fraction_static": 0.55, "base_port": free_port(),
                               "router_port": free_port(), "router_policy": "round_robin",
                               "server_command": fake, "health_timeout_s": 60,
                               "extra_server_args": ["--fake-token-delay", "0"]}},
    }  # fmt: skip
    cfg = config_from_dict(raw)
    eng = build_sglang_engine(cfg, HF, tmp_path / "work", device="cpu")
    try:
        argv = eng.servers[0].process.argv
        assert eng.router_process is not None
        router_argv = eng.router_process.argv
        batch = eng.generate(PROMPTS, 2, SamplingParams(max_new_tokens=2))
    finally:
        eng.shutdown()
    assert len(batch.samples()) == 4
    flags = dict(itertools.pairwise(argv))
    assert flags["--dtype"] == "float16" and flags["--mem-fraction-static"] == "0.55"
    assert flags["--load-format"] == "dummy" and flags["--random-seed"] == "5"
    # device cpu: no --enable-memory-saver (torch-memory-saver needs libcuda)
    assert "--enable-memory-saver" not in argv and argv[-2:] == ["--fake-token-delay", "0"]
    assert dict(itertools.pairwise(router_argv))["--policy"] == "round_robin"
    assert [s.url for s in eng.servers] == [
        f"http://127.0.0.1:{raw['rollout']['sglang']['base_port'] + k}" for k in range(2)
    ]


@pytest.mark.timeout(30)
def test_fp8_sync_sends_e4m3_weights_and_block_scale_inv(fakes, tmp_path):
    """rollout.fp8: each linear weight goes out as float8_e4m3fn plus its fp32
    `_scale_inv` [ceil(out/128), ceil(in/128)] (the names, dtypes and shapes SGLang
    0.5.23's Fp8LinearMethod.create_weights registers for block-wise checkpoints,
    `sglang/srt/layers/quantization/fp8.py`); norms and embeddings go as bf16."""
    import torch

    a = fakes()
    base = tmp_path / "base"
    base.mkdir()
    (base / "config.json").write_text('{"model_type": "qwen3"}')
    cfg = _cfg(tmp_path, [a.url], rollout={"fp8": True, "weight_sync": "disk"})
    eng = build_sglang_engine(cfg, HF, tmp_path / "work", device="cpu")
    eng.sync_cfg = type(eng.sync_cfg)(**{**eng.sync_cfg.__dict__, "base_model_dir": str(base)})
    g = torch.Generator().manual_seed(0)
    q = torch.randn(200, 130, generator=g)
    sent = [("model.layers.0.self_attn.q_proj.weight", q),
            ("model.layers.0.input_layernorm.weight", torch.ones(130)),
            ("model.embed_tokens.weight", torch.randn(64, 130, generator=g))]  # fmt: skip
    try:
        eng.update_weights([sent], version=1)
    finally:
        eng.shutdown()
    got = {k: v for k, v in a.received.items()}
    w = got["model.layers.0.self_attn.q_proj.weight"]
    s = got["model.layers.0.self_attn.q_proj.weight_scale_inv"]
    assert w.dtype == torch.float8_e4m3fn and list(w.shape) == [200, 130]
    assert s.dtype == torch.float32 and list(s.shape) == [2, 2]  # ceil(200/128), ceil(130/128)
    # dequantised (each 128x128 block times its scale) it is the weight to e4m3 precision
    deq = w.float() * s.repeat_interleave(128, 0)[:200].repeat_interleave(128, 1)[:, :130]
    assert torch.allclose(deq, q, rtol=0.07, atol=1e-3)
    assert got["model.layers.0.input_layernorm.weight"].dtype == torch.bfloat16
    emb = got["model.embed_tokens.weight"]
    assert emb.dtype == torch.bfloat16 and torch.equal(emb, sent[2][1].to(torch.bfloat16))
    assert "model.layers.0.self_attn.q_proj.weight_scale" not in got  # no per-tensor scales
