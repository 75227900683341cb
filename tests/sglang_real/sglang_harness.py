"""The real SGLang 0.5.23 server and sglang-router 0.3.2 on this CPU-only machine.

`sglang_python()` installs (once per machine, cached) SGLang into a venv of its own with
scripts/install_sglang.sh and returns its interpreter; under CI=true a failed install
fails the test, elsewhere it skips with the reason. `server_args()` gives the launch
flags of SGLang's CPU path (torch-native attention, no CUDA graphs) and the environment
with the two import shims of tests/sglang_real/shims on PYTHONPATH.

The `sgl_kernel` shim records every call into the file named by ARCHER_SGL_KERNEL_CALLS;
`assert_no_kernel_calls()` fails a test if any happened.
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest

from archer_mcore.rollout.sglang_launcher import (
    ManagedProcess,
    RouterArgs,
    SGLangServerArgs,
    build_router_command,
    build_server_command,
    free_port,
    server_env,
    wait_healthy,
)

REPO = Path(__file__).resolve().parents[2]
SHIMS = Path(__file__).resolve().parent / "shims"
INSTALL = REPO / "scripts" / "install_sglang.sh"
SGLANG_VERSION = "0.5.23"
VENV = Path(
    os.environ.get(
        "ARCHER_SGLANG_VENV", Path.home() / ".cache" / "archer-mcore" / f"sglang-{SGLANG_VERSION}"
    )
)
# SGLang's CPU path (SGLANG_CPU.md, measured): torch-native attention and sampling, no
# CUDA graphs, a small KV pool. --device cpu with SGLANG_USE_CPU_ENGINE=1.
CPU_FLAGS = (
    "--device", "cpu",
    "--attention-backend", "torch_native",
    "--sampling-backend", "pytorch",
    "--cuda-graph-backend-decode", "disabled",
    "--cuda-graph-backend-prefill", "disabled",
    "--max-total-tokens", "4096",
    "--max-running-requests", "8",
    # no prefix (radix) cache: SGLang returns input log-probs only for positions it
    # computes, and the sync checks score sequences the server has just sampled
    "--disable-radix-cache",
)  # fmt: skip

# On CPU SGLang sizes its pools against the machine's RAM: the static fraction must
# exceed 1 - available/total, and on a shared 24 GiB machine little may be available
# (0.8 was refused once at "minimum viable 0.862"). The KV pool is capped by
# --max-total-tokens anyway.
CPU_MEM_FRACTION = 0.98

#: The tiny Qwen3 every real-server test uses (the SGLang CPU recipe's size).
TINY_QWEN3: dict[str, Any] = dict(
    model_type="qwen3",
    architectures=["Qwen3ForCausalLM"],
    vocab_size=256,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    max_position_embeddings=512,
    rms_norm_eps=1e-6,
    rope_theta=10000.0,
    hidden_act="silu",
    tie_word_embeddings=False,
    attention_bias=False,
    eos_token_id=1,
    bos_token_id=2,
    pad_token_id=0,
    torch_dtype="float32",
    initializer_range=0.2,
)

_install_error: str | None = None
_installed = False


def sglang_python() -> Path:
    """The SGLang venv's python, installing it on first use. Skips (fails under CI=true)
    when the install fails."""
    global _install_error, _installed
    if not _installed and _install_error is None:
        env = {**os.environ, "ARCHER_SGLANG_VENV": str(VENV)}
        try:
            r = subprocess.run(["bash", str(INSTALL)], env=env, capture_output=True, text=True,
                               timeout=1800, cwd=REPO)  # fmt: skip
            if r.returncode == 0:
                _installed = True
            else:
                _install_error = f"exit {r.returncode}: {(r.stdout + r.stderr)[-1500:]}"
        except (OSError, subprocess.TimeoutExpired) as e:
            _install_error = f"{type(e).__name__}: {e}"
    if not _installed:
        reason = f"real SGLang {SGLANG_VERSION} not installable ({INSTALL}): {_install_error}"
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(reason)
        pytest.skip(reason)
    return VENV / "bin" / "python"


def server_launch() -> tuple[str, ...]:
    return (str(sglang_python()), "-m", "sglang.launch_server")


def router_launch() -> tuple[str, ...]:
    return (str(sglang_python()), "-m", "sglang_router.launch_router")


def server_args(
    model_path: str | Path,
    calls_log: Path,
    dtype: str = "float32",
    tp_size: int = 1,
    extra: Sequence[str] = (),
    **kw: object,
) -> SGLangServerArgs:
    """Launch arguments of one real server on 127.0.0.1 (a free port) on the CPU path."""
    env = (
        ("PYTHONPATH", str(SHIMS)),
        ("SGLANG_USE_CPU_ENGINE", "1"),
        ("ARCHER_SGL_KERNEL_CALLS", str(calls_log)),
        ("OMP_NUM_THREADS", "1"),
    )
    kw.setdefault("mem_fraction_static", CPU_MEM_FRACTION)
    return SGLangServerArgs(model_path=str(model_path), port=free_port(), dtype=dtype,
                            tp_size=tp_size, extra_args=(*CPU_FLAGS, *extra), env=env,
                            **kw)  # type: ignore[arg-type]  # fmt: skip


def assert_no_kernel_calls(calls_log: Path) -> None:
    """The sgl_kernel placeholder is import-only: any recorded call fails the test."""
    if calls_log.exists() and calls_log.read_text().strip():
        pytest.fail(f"SGLang called the sgl_kernel placeholder on CPU:\n{calls_log.read_text()}")


class RealServers:
    """Real SGLang servers (and optionally the router) as child processes."""

    def __init__(self, log_dir: Path, kernel_calls: Path) -> None:
        self.log_dir = log_dir
        self.kernel_calls = kernel_calls
        self.procs: list[ManagedProcess] = []
        self.urls: list[str] = []
        self.args: list[Any] = []
        self.router_url: str | None = None

    def start(self, model_dir: Path, count: int, deadline_s: float = 300.0, **kw: Any) -> None:
        started = []
        for _ in range(count):
            a = server_args(model_dir, self.kernel_calls, **kw)
            p = ManagedProcess(build_server_command(a, server_launch()), server_env(a),
                               self.log_dir / f"server_{a.port}.log")  # fmt: skip
            p.start()
            self.procs.append(p)
            self.args.append(a)
            started.append((a, p))
        for a, p in started:
            wait_healthy(a.url, deadline_s, p)
            self.urls.append(a.url)

    def start_router(self, policy: str = "round_robin", deadline_s: float = 120.0,
                     api_key_file: str | None = None) -> str:  # fmt: skip
        ra = RouterArgs(worker_urls=tuple(self.urls), port=free_port(), policy=policy,
                        api_key_file=api_key_file)  # fmt: skip
        p = ManagedProcess(build_router_command(ra, router_launch()), None,
                           self.log_dir / f"router_{ra.port}.log")  # fmt: skip
        p.start()
        self.procs.append(p)
        wait_healthy(ra.url, deadline_s, p)
        self.router_url = ra.url
        return ra.url

    def stop(self) -> None:
        for p in reversed(self.procs):
            p.stop()
