"""Weight sync of a Qwen3-MoE to the real SGLang 0.5.23 (issue 23 item 4), on the CPU.

SGLang's `Qwen3MoeForCausalLM.load_weights` (sglang/srt/models/qwen3_moe.py) takes the
checkpoint's names: per expert ``model.layers.{i}.mlp.experts.{e}.{gate,up,down}_proj
.weight``, mapped by `FusedMoE.make_expert_params_mapping` onto its fused ``w13_weight``
(gate = shard w1, up = w3) and ``w2_weight``, and the router ``mlp.gate.weight``;
attention as Qwen3's (q/k/v stacked into qkv_proj). It skips a name it does not know
without a word, so the proof is the log-probs: a real server started from the project's
own export of a tiny MoE Megatron policy (fp32, 4 experts, top 2), then after a sync
by each mode (distributed over gloo, tensor, disk) of the moved policy, scores fixed
responses with the Megatron policy's log-probs (FP32_ATOL): every expert, the router and
the attention reached the served model. The CPU server runs the MoE with its
torch-native path; block-FP8 MoE weights need AMX (SGLang's CPU Fp8 method), untested
here."""

from __future__ import annotations

import json
import os
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from logprob_check import FP32_ATOL, assert_close_logprobs, greedy, policy_logprobs, server_logprobs
from sglang_harness import TINY_QWEN3, RealServers

from archer_mcore.model.hf_io import write_hf_checkpoint
from archer_mcore.rollout.http_client import ClientConfig
from archer_mcore.rollout.sglang_engine import SGLangEngine
from archer_mcore.rollout.sglang_protocol import WeightSyncConfig

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]
TINY_MOE: dict[str, Any] = {
    **TINY_QWEN3,
    "model_type": "qwen3_moe",
    "architectures": ["Qwen3MoeForCausalLM"],
    "moe_intermediate_size": 32,
    "num_experts": 4,
    "num_experts_per_tok": 2,
    "norm_topk_prob": True,
    "decoder_sparse_step": 1,
    "mlp_only_layers": [],
}
PROMPTS = [[5, 6, 7, 8], [20, 21], [40, 41, 42, 43, 44, 45]]
CLIENT = ClientConfig(max_concurrency=8, request_timeout_s=120.0, max_retries=2)


@pytest.fixture(scope="module")
def moe_policy() -> Iterator[Any]:
    """The project's Megatron policy over the tiny Qwen3-MoE (fp32, EP 1), random init,
    in this process (a world of one; undone at the end)."""
    from archer_mcore.actor.policy import MegatronPolicy
    from archer_mcore.actor.policy_config import PolicyConfig
    from archer_mcore.config import ModelConfig, OptimizerConfig
    from archer_mcore.parallel import cpu_compat
    from archer_mcore.parallel.distributed import destroy_distributed

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    saved = {k: os.environ.get(k) for k in ("MASTER_ADDR", "MASTER_PORT")}
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    cfg = PolicyConfig(seed=5, with_reference=False, optimizer=OptimizerConfig(lr=1e-3),
                       model=ModelConfig(params_dtype="float32"))  # fmt: skip
    pol = MegatronPolicy.from_hf(dict(TINY_MOE), cfg)
    try:
        _perturb(pol, 1)  # a router far from uniform: tokens pick different experts
        yield pol
    finally:
        destroy_distributed()
        cpu_compat.deactivate()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _perturb(policy: Any, seed: int, scale: float = 0.3) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in policy.unwrapped().parameters():
            p.add_(scale * torch.randn(p.shape, generator=g, dtype=torch.float32).to(p.dtype))


def _check(url: str, policy: Any, fixed: list[tuple[list[int], list[int]]], what: str) -> float:
    want = policy_logprobs(policy, [p for p, _ in fixed], [r for _, r in fixed])
    got = [server_logprobs(url, p, r) for p, r in fixed]
    return assert_close_logprobs(got, want, FP32_ATOL, what)


def test_every_sync_mode_reaches_the_served_moe(moe_policy: Any, tmp_path: Path,
                                                kernel_calls: Path) -> None:  # fmt: skip
    base = tmp_path / "base"
    base.mkdir()
    (base / "config.json").write_text(json.dumps(TINY_MOE, indent=1))
    sent = [t for b in moe_policy.export_hf_buckets(16 * 1024) for t in b]
    names = {n for n, _ in sent}
    # the names SGLang's loader maps: per expert, the router, no fused expert tensor
    assert "model.layers.1.mlp.experts.3.up_proj.weight" in names
    assert "model.layers.0.mlp.gate.weight" in names
    assert not any(n.endswith(("gate_up_proj", "experts.down_proj")) for n in names)
    model = tmp_path / "model"
    write_hf_checkpoint([sent], model, base)
    rs = RealServers(tmp_path / "logs", kernel_calls)
    try:
        rs.start(model, 1, deadline_s=400)
        url = rs.urls[0]
        fixed = [(p, [(7 * i + 3 * j) % 200 + 3 for j in range(6)]) for i, p in enumerate(PROMPTS)]
        worst = {"start": _check(url, moe_policy, fixed, "start")}
        syncs = {
            "distributed": WeightSyncConfig(mode="distributed", backend="gloo", device="cpu",
                                            master_address="127.0.0.1", timeout_s=120),
            "tensor": WeightSyncConfig(mode="tensor"),
            "disk": WeightSyncConfig(mode="disk", disk_dir=str(tmp_path / "sync"),
                                     base_model_dir=str(base)),
        }  # fmt: skip
        for version, (mode, sync) in enumerate(syncs.items(), start=1):
            before = greedy(url, PROMPTS[0])
            _perturb(moe_policy, 10 + version)
            engine = SGLangEngine([url], client=CLIENT, weight_sync=sync)
            try:
                engine.update_weights(moe_policy.export_hf_buckets(16 * 1024), version=version)
            finally:
                engine.shutdown()
            worst[mode] = _check(url, moe_policy, fixed, mode)
            assert greedy(url, PROMPTS[0]) != before, mode  # the served weights moved
        print(f"\nlargest |server - policy| log-prob per sync: {worst}")
    finally:
        rs.stop()
