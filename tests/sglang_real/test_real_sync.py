"""SGLangEngine against two real SGLang 0.5.23 servers (CPU, fp32, tiny Qwen3 exported
from the project's Megatron policy) behind the real sglang-router 0.3.2.

After every weight sync (distributed over gloo, disk, tensor) each server's log-probs
of a fixed set of responses equal the Megatron policy's own (fp32, FP32_ATOL), and
greedy output changes when the weights change."""

from __future__ import annotations

from typing import Any

import httpx2
import pytest
import torch
from logprob_check import (
    FP32_ATOL,
    assert_close_logprobs,
    greedy,
    policy_logprobs,
    server_logprobs,
)

from archer_mcore.rollout.http_client import ClientConfig
from archer_mcore.rollout.sglang_engine import SGLangEngine
from archer_mcore.rollout.sglang_protocol import WeightSyncConfig
from archer_mcore.rollout.types import SamplingParams

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]
PROMPTS = [[5, 6, 7, 8], [20, 21], [40, 41, 42, 43, 44, 45]]
CLIENT = ClientConfig(max_concurrency=8, request_timeout_s=120.0, max_retries=2)


def _perturb(policy: Any, seed: int, scale: float = 0.3) -> None:
    """Move every weight of the policy (a stand-in for an optimizer step that changes
    the model visibly)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in policy.unwrapped().parameters():
            p.add_(scale * torch.randn(p.shape, generator=g, dtype=torch.float32).to(p.dtype))


def _check_servers_match_policy(urls: list[str], policy: Any, fixed: list[tuple[list[int],
                                list[int]]]) -> float:  # fmt: skip
    want = policy_logprobs(policy, [p for p, _ in fixed], [r for _, r in fixed])
    worst = 0.0
    for url in urls:
        got = [server_logprobs(url, p, r) for p, r in fixed]
        worst = max(worst, assert_close_logprobs(got, want, FP32_ATOL, url))
    return worst


def _sync(engine: SGLangEngine, policy: Any, version: int) -> None:
    engine.update_weights(policy.export_hf_buckets(16 * 1024), version=version)


def _model_info_version(url: str) -> str:
    return str(httpx2.get(url + "/model_info", timeout=30, trust_env=False).json()
               .get("weight_version"))  # fmt: skip


def test_generate_and_every_sync_mode_keep_servers_equal_to_policy(real_servers, policy,
                                                                   tmp_path):  # fmt: skip
    urls = real_servers.urls
    dist = WeightSyncConfig(mode="distributed", backend="gloo", device="cpu",
                            master_address="127.0.0.1", timeout_s=120)  # fmt: skip
    engine = SGLangEngine(urls, router_url=real_servers.router_url, client=CLIENT,
                          weight_sync=dist)  # fmt: skip
    try:
        # start-up checks read each server's /server_info
        assert {u: i["version"] for u, i in engine.server_info.items()} == {
            u: "0.5.23" for u in urls
        }
        assert [s.num_gpus for s in engine.servers] == [1, 1]

        # rollout through the router: sampled responses with their log-probs
        params = SamplingParams(temperature=1.0, max_new_tokens=6, ignore_eos=True)
        batch = engine.generate(PROMPTS, 2, params)
        samples = batch.samples()
        assert len(samples) == 6 and all(len(s.token_ids) == 6 for s in samples)
        fixed = [(list(s.prompt_ids), list(s.token_ids)) for s in samples]
        # the sampling log-probs SGLang returned are the policy's (servers started from
        # the policy's export)
        want = policy_logprobs(policy, [p for p, _ in fixed], [r for _, r in fixed])
        assert_close_logprobs([s.logprobs for s in samples], want, FP32_ATOL, "rollout")
        _check_servers_match_policy(urls, policy, fixed)
        greedy0 = greedy(urls[0], PROMPTS[0])

        # 1. distributed (gloo), twice: the second reuses the group
        for version, seed in ((1, 11), (2, 12)):
            _perturb(policy, seed)
            _sync(engine, policy, version)
            _check_servers_match_policy(urls, policy, fixed)
            assert [_model_info_version(u) for u in urls] == [str(version)] * 2
        greedy_dist = greedy(urls[0], PROMPTS[0])
        assert greedy_dist != greedy0, "greedy output unchanged after the weights changed"
        assert greedy(urls[1], PROMPTS[0]) == greedy_dist
        calls = list(engine.session_log)
        assert calls[0] == "begin" and calls[-1] == "end"
        assert calls.count("begin") == calls.count("end") == 2
    finally:
        engine.shutdown()

    # 2. a new trainer-side engine (as after a trainer restart): the servers still hold
    # the old group; init destroys it first instead of hanging in rendezvous
    engine = SGLangEngine(urls, client=CLIENT, weight_sync=dist)
    try:
        _perturb(policy, 13)
        _sync(engine, policy, 3)
        _check_servers_match_policy(urls, policy, fixed)
    finally:
        engine.shutdown()

    # 3. disk: checkpoint + /update_weights_from_disk (load_format "auto")
    disk = WeightSyncConfig(mode="disk", disk_dir=str(tmp_path / "sync"),
                            base_model_dir=str(real_servers.model_dir))  # fmt: skip
    engine = SGLangEngine(urls, client=CLIENT, weight_sync=disk)
    try:
        before = greedy(urls[0], PROMPTS[0])
        _perturb(policy, 14)
        _sync(engine, policy, 4)
        _check_servers_match_policy(urls, policy, fixed)
        assert greedy(urls[0], PROMPTS[0]) != before
    finally:
        engine.shutdown()

    # 4. tensor (colocated path: same host, shared memory), inside begin/end sessions
    tensor = WeightSyncConfig(mode="tensor")
    engine = SGLangEngine(urls, client=CLIENT, weight_sync=tensor)
    try:
        _perturb(policy, 15)
        _sync(engine, policy, 5)
        _check_servers_match_policy(urls, policy, fixed)
        assert engine.session_log[0] == "begin" and engine.session_log[-1] == "end"
        assert "update_weights_from_tensor" in engine.session_log
    finally:
        engine.shutdown()
