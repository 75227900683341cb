"""`archer train configs/demo_cpu.yaml` against two real SGLang 0.5.23 servers: in
disaggregated mode behind the real sglang-router, 3 RL steps with a gloo weight sync
before each rollout and one server SIGKILLed mid-run; in colocated mode with servers the
trainer launches, synced by tensor."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from sglang_harness import CPU_MEM_FRACTION, RealServers

from archer_mcore.config import load_config

pytestmark = [pytest.mark.slow, pytest.mark.timeout(1500)]
REPO = Path(__file__).resolve().parents[2]
DEMO = REPO / "configs" / "demo_cpu.yaml"
ARCHER = [sys.executable, "-m", "archer_mcore.cli"]
# The demo's warm start as it is (cached in .cache/archer/warmstart, which `make demo`
# fills in CI first), then 3 short RL steps without eval.
SHORT = [
    "train.steps=3", "train.prompts_per_step=8", "train.mini_batch_prompts=8",
    "eval.every=0", "checkpoint.save_every=0", "metrics.port=0",
]  # fmt: skip


def _overrides(tmp: Path, rs: RealServers, extra: list[str] = ()) -> list[str]:
    urls = "[" + ",".join(f'"{u}"' for u in rs.urls) + "]"
    sglang = [
        "rollout.engine=sglang", "rollout.mode=disaggregated",
        f"rollout.sglang.server_urls={urls}", f"rollout.sglang.router_url={rs.router_url}",
        "rollout.sglang.sync_backend=gloo", "rollout.sglang.dtype=float32",
        "rollout.sglang.master_address=127.0.0.1", "rollout.sglang.request_timeout_s=300",
        "rollout.sglang.sync_timeout_s=120", "rollout.sglang.max_retries=6",
        f"rollout.sglang.mem_fraction_static={CPU_MEM_FRACTION}",
        f"train.output_dir={tmp / 'out'}",
    ]  # fmt: skip
    return [*SHORT, *sglang, *extra]


def _server_model(tmp: Path) -> Path:
    """config.json of the run's policy (what the trainer itself derives from the demo
    config); the servers start with random weights (--load-format dummy) and get the
    policy's at the loop's first sync."""
    from archer_mcore.data.prepare import build_tokenizer
    from archer_mcore.train.components import hf_config_dict

    cfg = load_config(DEMO, SHORT)
    tok = build_tokenizer(cfg, REPO / cfg.warmstart.cache_dir)
    out = tmp / "server_model"
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(hf_config_dict(cfg, tok), indent=1))
    return out


def _train(tmp: Path, overrides: list[str], log: Path, kill: tuple[int, str] | None = None,
           rs: RealServers | None = None,
           env_extra: dict[str, str] | None = None) -> subprocess.CompletedProcess:  # fmt: skip
    cmd = [*ARCHER, "train", str(DEMO)] + [a for o in overrides for a in ("-o", o)]
    from archer_mcore.rollout.sglang_launcher import free_port

    env = {**os.environ, "OMP_NUM_THREADS": "1", "MASTER_ADDR": "127.0.0.1",
           "MASTER_PORT": str(free_port()), **(env_extra or {})}  # fmt: skip
    with open(log, "w") as out:
        p = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT)
        if kill is not None:  # SIGKILL server `index` once the trainer prints `marker`
            index, marker = kill
            deadline = time.monotonic() + 900
            while marker not in log.read_text() and p.poll() is None:
                assert time.monotonic() < deadline, "trainer never reached the kill point"
                time.sleep(0.5)
            assert rs is not None
            os.killpg(rs.procs[index].proc.pid, signal.SIGKILL)
        rc = p.wait(timeout=1200)
    return subprocess.CompletedProcess(cmd, rc, log.read_text(), "")


def _metrics(tmp: Path) -> list[dict]:
    path = tmp / "out" / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def test_sigkill_of_one_server_mid_run(tmp_path, kernel_calls):
    """3 steps of `archer train` against two real servers behind the real router, a
    gloo weight sync before each rollout; one server SIGKILLed once step 1 is done: the
    engine names it as down, takes it out of the router and the weight-update group,
    and the run finishes on the other server (disaggregated servers are not the
    trainer's to restart). (The run without a kill, 40 steps under Slurm with 2 ranks,
    is tests/cluster/test_rehearsal.py; this test once had a twin without the kill.)"""
    model = _server_model(tmp_path)
    rs = RealServers(tmp_path / "logs", kernel_calls)
    try:
        rs.start(model, 2, extra=("--load-format", "dummy"))
        rs.start_router()
        killed = rs.urls[1]
        run = _train(tmp_path, _overrides(tmp_path, rs), tmp_path / "train.log",
                     kill=(1, "step 1/3"), rs=rs)  # fmt: skip
    finally:
        rs.stop()
    assert run.returncode == 0, run.stdout[-4000:]
    assert f"SGLang server {killed} is down" in run.stdout
    assert "weight sync in progress" not in run.stdout
    rows = _metrics(tmp_path)
    assert [r["step"] for r in rows] == [1.0, 2.0, 3.0]
    # step 1 ran on both servers with the weights of the last sync: their sampling
    # log-probs equal the trainer's recomputation (fp32 both sides; measured 2.6e-7)
    assert rows[0]["rollout/logprob_abs_diff"] < 1e-5, rows[0]
    assert all(r["rollout/logprob_abs_diff"] < 1e-4 for r in rows)
    assert all(r["sync/bytes"] > 0 for r in rows)


def test_archer_train_colocated_launches_servers_and_syncs_by_tensor(tmp_path, kernel_calls):
    """Colocated mode: the trainer launches two real servers itself (server_command =
    the SGLang venv, random weights until the first sync) and the router; each step
    releases the servers' memory while the policy trains, resumes the weights for the
    /update_weights_from_tensor sync (inside begin/end) and the KV cache for the next
    rollout. (On CPU the servers run without --enable-memory-saver, which needs
    libcuda: the release/resume calls are answered 200 and change nothing.)"""
    from sglang_harness import CPU_FLAGS, SHIMS, server_launch

    from archer_mcore.rollout.sglang_launcher import free_port

    extra = "[" + ",".join(f'"{a}"' for a in CPU_FLAGS) + "]"
    command = "[" + ",".join(f'"{a}"' for a in server_launch()) + "]"
    ov = [*SHORT, f"train.output_dir={tmp_path / 'out'}",
          "rollout.engine=sglang", "rollout.mode=colocated", "rollout.weight_sync=tensor",
          "rollout.sglang.num_servers=2", "rollout.sglang.dtype=float32",
          f"rollout.sglang.mem_fraction_static={CPU_MEM_FRACTION}",
          f"rollout.sglang.base_port={free_port()}", f"rollout.sglang.router_port={free_port()}",
          "rollout.sglang.router_policy=round_robin", "rollout.sglang.health_timeout_s=400",
          f"rollout.sglang.server_command={command}",
          f"rollout.sglang.extra_server_args={extra}"]  # fmt: skip
    env_extra = {"PYTHONPATH": str(SHIMS), "SGLANG_USE_CPU_ENGINE": "1",
                 "ARCHER_SGL_KERNEL_CALLS": str(kernel_calls)}  # fmt: skip
    run = _train(tmp_path, ov, tmp_path / "train.log", env_extra=env_extra)
    assert run.returncode == 0, run.stdout[-4000:]
    rows = _metrics(tmp_path)
    assert [r["step"] for r in rows] == [1.0, 2.0, 3.0]
    for r in rows:
        assert r["rollout/logprob_abs_diff"] < 1e-5, r
    # the call order the engine logged, per step: release while training, weights back,
    # the tensor update session, KV cache back for the rollout
    calls = [line.split("sglang calls: ", 1)[1] for line in run.stdout.splitlines()
             if "sglang calls: " in line]  # fmt: skip
    assert calls, run.stdout[-3000:]
    # (one bucket: one update per server, both inside the same begin/end session)
    step_order = ("release_memory_occupation:weights+kv_cache resume_memory_occupation:weights "
                  "begin update_weights_from_tensor update_weights_from_tensor end "
                  "resume_memory_occupation:kv_cache")  # fmt: skip
    assert calls[-1].endswith(step_order), calls[-1]
    server_logs = sorted((tmp_path / "out" / "sglang" / "logs").glob("sglang_server_*.log"))
    assert len(server_logs) == 2
    for log in server_logs:
        text = log.read_text()
        assert "POST /release_memory_occupation HTTP/1.1\" 200" in text
        assert "POST /update_weights_from_tensor HTTP/1.1\" 200" in text
