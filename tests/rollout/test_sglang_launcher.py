"""The launcher: exact command lines, environment, health waiting and process cleanup."""

from __future__ import annotations

import os
import sys
import time

import pytest

from archer_mcore.rollout.sglang_engine import SGLangEngine
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
from archer_mcore.rollout.types import RolloutError


def test_server_command_line_exact():
    args = SGLangServerArgs(
        model_path="/ckpt/Qwen3-8B", port=30001, host="10.0.0.5", tp_size=4, dp_size=2,
        mem_fraction_static=0.7, dtype="bfloat16", random_seed=11, load_format="dummy",
        quantization="fp8", enable_memory_saver=True, deterministic_inference=True,
        cuda_visible_devices="4,5,6,7", extra_args=("--context-length", "32768"),
    )  # fmt: skip
    assert build_server_command(args) == [
        sys.executable, "-m", "sglang.launch_server",
        "--model-path", "/ckpt/Qwen3-8B", "--host", "10.0.0.5", "--port", "30001",
        "--tp-size", "4", "--dp-size", "2", "--mem-fraction-static", "0.7",
        "--dtype", "bfloat16", "--random-seed", "11", "--skip-tokenizer-init",
        "--load-format", "dummy", "--quantization", "fp8", "--enable-memory-saver",
        "--enable-deterministic-inference", "--context-length", "32768",
    ]  # fmt: skip
    assert args.url == "http://10.0.0.5:30001" and args.num_gpus == 8
    minimal = SGLangServerArgs(model_path="m", port=1, skip_tokenizer_init=False)
    assert build_server_command(minimal, launch=("sglang-serve",)) == [
        "sglang-serve", "--model-path", "m", "--host", "127.0.0.1", "--port", "1",
        "--tp-size", "1", "--dp-size", "1", "--mem-fraction-static", "0.8",
        "--dtype", "bfloat16", "--random-seed", "0",
    ]  # fmt: skip


def test_server_env_forces_tempered_logprobs_and_gpus():
    args = SGLangServerArgs(model_path="m", port=1, cuda_visible_devices="2,3")
    env = server_env(args, base={"PATH": "/bin", "SGLANG_RETURN_ORIGINAL_LOGPROB": "1"})
    assert env == {"PATH": "/bin", "SGLANG_RETURN_ORIGINAL_LOGPROB": "false",
                   "CUDA_VISIBLE_DEVICES": "2,3"}  # fmt: skip


def test_router_command_line_exact():
    ra = RouterArgs(worker_urls=("http://a:1", "http://b:2"), port=30000, policy="round_robin",
                    health_check_interval_secs=3, extra_args=("--log-level", "warn"))  # fmt: skip
    assert build_router_command(ra) == [
        sys.executable, "-m", "sglang_router.launch_router",
        "--worker-urls", "http://a:1", "http://b:2", "--policy", "round_robin",
        "--host", "127.0.0.1", "--port", "30000", "--health-check-interval-secs", "3",
        "--health-check-timeout-secs", "5", "--health-failure-threshold", "2",
        # its own metrics on its host, not sglang-router's default 0.0.0.0:29000
        "--prometheus-host", "127.0.0.1", "--prometheus-port", "30001",
        "--log-level", "warn",
    ]  # fmt: skip
    with pytest.raises(ValueError, match="policy"):
        RouterArgs(worker_urls=("http://a:1",), port=1, policy="fastest")


def test_bad_server_args_rejected():
    with pytest.raises(ValueError, match="mem_fraction_static"):
        SGLangServerArgs(model_path="m", port=1, mem_fraction_static=1.5)
    with pytest.raises(ValueError, match="tp_size"):
        SGLangServerArgs(model_path="m", port=1, tp_size=0)


@pytest.mark.timeout(30)
def test_wait_healthy_reports_exit_code_and_log(tmp_path):
    p = ManagedProcess([sys.executable, "-c", "print('cuda init failed'); raise SystemExit(7)"],
                       None, tmp_path / "s.log")  # fmt: skip
    p.start()
    with pytest.raises(RolloutError, match=r"(?s)exited with code 7.*cuda init failed"):
        wait_healthy(f"http://127.0.0.1:{free_port()}", 20, p)


@pytest.mark.timeout(30)
def test_wait_healthy_deadline_and_stop_kills_process_group(tmp_path):
    # a server that never listens; its child sleeps too: stop() must take both
    code = "import subprocess, time; subprocess.Popen(['sleep', '60']); print('up', flush=True); time.sleep(60)"
    p = ManagedProcess([sys.executable, "-c", code], None, tmp_path / "s.log")
    p.start()
    t0 = time.monotonic()
    with pytest.raises(RolloutError, match="not healthy within 1s"):
        wait_healthy(f"http://127.0.0.1:{free_port()}", 1.0, p)
    assert time.monotonic() - t0 < 5
    pgid = p.proc.pid
    p.stop(grace_s=2)
    assert not p.alive
    deadline = time.monotonic() + 10  # the orphaned child is reaped by init, not by us
    while time.monotonic() < deadline:
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            break
        time.sleep(0.1)
    with pytest.raises(ProcessLookupError):
        os.killpg(pgid, 0)  # no process of the group is left


@pytest.mark.timeout(60)
def test_launch_failure_stops_already_started_servers(tmp_path):
    fake = os.path.join(os.path.dirname(__file__), "fake_sglang.py")
    good = SGLangServerArgs(model_path="m", port=free_port())
    # the stand-in takes sglang's flags plus its own; a malformed one makes it exit (2)
    bad = SGLangServerArgs(model_path="m", port=free_port(), extra_args=("--fake-die-after", "x"))
    with pytest.raises(RolloutError, match=r"(?s)exited with code 2.*invalid int value"):
        engine = SGLangEngine.launch([good, bad], tmp_path, router=None,
                                     server_launch=(sys.executable, fake), health_deadline_s=20)  # fmt: skip
        engine.shutdown()  # reached only if launch wrongly succeeded: leave no process
    # the first (healthy) server was stopped again: its port is free
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", good.port))
