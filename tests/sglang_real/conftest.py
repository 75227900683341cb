"""Fixtures of the real-SGLang tests: the project's Megatron policy (fp32, tiny Qwen3),
its HF export, real SGLang 0.5.23 servers started from that export on 127.0.0.1
(output to files, stopped by pid) and the real sglang-router 0.3.2 in front of them."""

from __future__ import annotations

import json
import os
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from sglang_harness import TINY_QWEN3, RealServers, assert_no_kernel_calls

from archer_mcore.model.hf_io import write_hf_checkpoint


@pytest.fixture(scope="session")
def kernel_calls(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """The file the sgl_kernel placeholder records calls in; checked at the end."""
    path = tmp_path_factory.mktemp("sgl_kernel") / "calls.log"
    yield path
    assert_no_kernel_calls(path)


@pytest.fixture(scope="module")
def policy() -> Iterator[Any]:
    """The project's Megatron policy (fp32, TP=PP=1) over the tiny Qwen3, random init,
    in this process (torch.distributed world of one and the CPU compatibility layer,
    both undone at the end)."""
    from archer_mcore.actor.policy import MegatronPolicy
    from archer_mcore.actor.policy_config import PolicyConfig
    from archer_mcore.config import ModelConfig, OptimizerConfig
    from archer_mcore.parallel.distributed import destroy_distributed

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    saved = {k: os.environ.get(k) for k in ("MASTER_ADDR", "MASTER_PORT")}
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    cfg = PolicyConfig(
        seed=3,
        with_reference=False,
        optimizer=OptimizerConfig(lr=1e-3),
        model=ModelConfig(params_dtype="float32"),
    )
    pol = MegatronPolicy.from_hf(dict(TINY_QWEN3), cfg)
    try:
        yield pol
    finally:
        from archer_mcore.parallel import cpu_compat

        destroy_distributed()
        cpu_compat.deactivate()  # from_hf activated it for the process: not for later tests
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def export_policy(policy: Any, out: Path) -> Path:
    """The policy as an HF checkpoint through the project's own export (the weight-sync
    buckets + write_hf_checkpoint) with the tiny config.json."""
    base = out.parent / (out.name + "_base")
    base.mkdir(parents=True, exist_ok=True)
    (base / "config.json").write_text(json.dumps(TINY_QWEN3, indent=1))
    write_hf_checkpoint(policy.export_hf_buckets(1 << 20), out, base)
    return out


@pytest.fixture(scope="module")
def real_servers(tmp_path_factory: pytest.TempPathFactory, kernel_calls: Path,
                 policy: Any) -> Iterator[RealServers]:  # fmt: skip
    """Two real TP=1 servers (fp32) started from the policy's export, behind the real
    router (round_robin, so both serve)."""
    root = tmp_path_factory.mktemp("real_sglang")
    model = export_policy(policy, root / "model")
    rs = RealServers(root / "logs", kernel_calls)
    rs.model_dir = model  # type: ignore[attr-defined]
    try:
        rs.start(model, 2)
        rs.start_router()
        yield rs
    finally:
        rs.stop()
