"""The cluster launch path, run for real (issue 27's rehearsal).

`archer submit` -> real Slurm (slurmctld + two slurmd "nodes" on 127.0.0.1, munge) ->
`slurm/archer_job.sh` -> real SGLang 0.5.23 CPU servers and the real sglang-router
started by the job script -> `archer train` (the real trainer) under torchrun with 2
ranks (DP=2, gloo) -> a distributed weight sync every step -> real Prometheus scraping
rank 0's exporter through the file_sd target the job writes -> a pre-emption
(`scancel --batch --signal=USR1`, as docs/slurm.md tells users) -> checkpoint ->
`scontrol requeue` by the job -> resume -> finish. Then the same for a colocated job
(servers launched by the trainer), `archer eval` of the final checkpoint, and its HF
export loaded by a real SGLang server.

The disaggregated job is pre-empted as docs/slurm.md tells users to stop a job by hand
(`scancel --batch --signal=USR1`: the job script forwards it to the training step and
requeues); the colocated one as Slurm pre-empts (`scontrol requeue`: SIGTERM to every
process of the job, the servers the trainer launched included, and Slurm requeues).

What runs for real here and what cannot (docs/slurm.md, "First run on a new cluster"):
gloo stands for NCCL, CPU SGLang for GPU SGLang (SGLANG_CPU.md), and both Slurm nodes
are this machine (NodeAddr 127.0.0.1), so the addresses are all loopback.

Wall time on the 2-core CI-class machine (2026-12-07, other test runs beside it): 7 min
for the module (disaggregated 3 min, colocated with eval and export 4 min); most of it
is SGLang server start-up (35-100 s each, four starts).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from services import REPO_ROOT, Prometheus, SlurmCluster, free_port, require_binary, wait_until
from sglang_harness import CPU_FLAGS, CPU_MEM_FRACTION, SHIMS, sglang_python

from archer_mcore.config import load_config

pytestmark = [pytest.mark.slow, pytest.mark.timeout(1800)]

DEMO = REPO_ROOT / "configs" / "demo_cpu.yaml"
DASHBOARD = REPO_ROOT / "monitoring" / "grafana" / "archer.json"
PROMETHEUS_YML = REPO_ROOT / "monitoring" / "prometheus" / "prometheus.yml"


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SlurmCluster]:
    require_binary("slurmctld")
    c = SlurmCluster(tmp_path_factory.mktemp("slurm"), nodes=("node1", "node2"))
    try:
        yield c
    finally:
        c.stop()


def run_overrides(out: Path, run_name: str, steps: int) -> list[str]:
    """The demo config shrunk to a few small steps, as `-o` flags of `archer submit`."""
    flags = []
    for ov in (
        f"train.run_name={run_name}",
        f"train.steps={steps}",
        f"train.output_dir={out}",
        "train.prompts_per_step=4",
        "train.mini_batch_prompts=2",
        "eval.every=0",
        # the demo's warm start as it is (cached in .cache/archer/warmstart, which `make
        # demo` fills in CI first): rewards vary within groups, so every update moves
        # the weights and every sync carries a new policy
        "checkpoint.save_every=0",
        # grpo (no group filter): every step updates and syncs
        "algorithm.name=grpo",
        "rollout.sglang.sync_backend=gloo",
        "rollout.sglang.dtype=float32",
        "rollout.sglang.request_timeout_s=300",
        "rollout.sglang.sync_timeout_s=120",
        f"rollout.sglang.mem_fraction_static={CPU_MEM_FRACTION}",
    ):
        flags += ["-o", ov]
    return flags


def server_model(out: Path, overrides: list[str]) -> Path:
    """config.json of the run's policy (what the trainer derives from the demo config);
    the servers start with random weights (--load-format dummy) and get the policy's
    at the first sync."""
    from archer_mcore.data.prepare import build_tokenizer
    from archer_mcore.train.components import hf_config_dict

    cfg = load_config(DEMO, [v for k, v in zip(overrides[::2], overrides[1::2]) if k == "-o"])
    tok = build_tokenizer(cfg, REPO_ROOT / cfg.warmstart.cache_dir)
    model = out / "server_model"
    model.mkdir(parents=True, exist_ok=True)
    (model / "config.json").write_text(json.dumps(hf_config_dict(cfg, tok), indent=1))
    return model


def submit(
    cluster: SlurmCluster, out: Path, *flags: str, capsys: pytest.CaptureFixture[str]
) -> str:
    """`archer submit` of the demo config against the test cluster; the job id."""
    rc = cluster.archer_submit(
        [
            str(DEMO),
            "--log-dir", str(out / "logs"),
            "--home", str(REPO_ROOT),
            "--python", sys.executable,
            "--gpus-per-node", "0",
            "--time", "30:00",
            "--signal-lead", "60",
            *flags,
        ]
    )  # fmt: skip
    captured = capsys.readouterr()
    text = captured.out + captured.err
    assert rc == 0, text
    m = re.search(r"Submitted batch job (\d+)", text)
    assert m, text
    return m.group(1)


def job_log(out: Path, job_id: str) -> str:
    logs = list((out / "logs").glob(f"*-{job_id}.out"))
    return logs[0].read_text(errors="replace") if logs else ""


def metric_rows(out: Path) -> list[dict[str, Any]]:
    path = out / "metrics.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def requeue_now(cluster: SlurmCluster, job_id: str, out: Path, restarts: int) -> None:
    """Wait for the job to requeue itself, then skip Slurm's requeue hold (BeginTime ~2
    min later, so the old run's steps are gone): start it as soon as the nodes are idle."""
    info = cluster.wait_job(job_id, ("PENDING", "COMPLETED", "FAILED", "CANCELLED"), 300)
    assert info["JobState"] == "PENDING" and info["Restarts"] == str(restarts), (
        info,
        job_log(out, job_id)[-6000:],
    )
    wait_until(cluster.nodes_idle, 120, "the first run's steps to finish")
    time.sleep(2)
    assert cluster.scontrol("update", f"JobId={job_id}", "StartTime=now").returncode == 0


def prometheus_with_file_sd(work: Path, targets_dir: Path) -> Prometheus:
    """monitoring/prometheus/prometheus.yml with its file_sd job `archer` pointed at the
    test's targets folder (and 1 s intervals); no static targets."""
    base = yaml.safe_load(PROMETHEUS_YML.read_text())
    base["global"]["scrape_interval"] = "1s"
    base["global"]["evaluation_interval"] = "1s"
    base["rule_files"] = []
    for job in base["scrape_configs"]:
        job.pop("static_configs", None)
        if job["job_name"] == "archer":
            job["file_sd_configs"] = [
                {"files": [f"{targets_dir}/*.json"], "refresh_interval": "1s"}
            ]
    base["scrape_configs"] = [j for j in base["scrape_configs"] if j["job_name"] == "archer"]
    return Prometheus(work, base)


def dashboard_expr(title: str) -> list[str]:
    """The queries of the dashboard panel `title`, as Grafana would send them."""
    dash = json.loads(DASHBOARD.read_text())
    exprs = [t["expr"] for p in dash["panels"] if p["title"] == title for t in p.get("targets", [])]
    assert exprs, f"no panel {title!r} in {DASHBOARD}"
    return exprs


def sglang_env_flags(server_port: int, router_port: int) -> list[str]:
    """The job script's environment for real SGLang on this CPU machine: the SGLang
    venv's server (with SGLang's CPU engine and the two import shims, SGLANG_CPU.md)
    and router."""
    py = sglang_python()
    server_cmd = f"env PYTHONPATH={SHIMS} SGLANG_USE_CPU_ENGINE=1 OMP_NUM_THREADS=1 {py} -m sglang.launch_server"
    flags = {
        "ARCHER_SGLANG_SERVER_CMD": server_cmd,
        "ARCHER_SGLANG_ROUTER_CMD": f"{py} -m sglang_router.launch_router",
        "ARCHER_SGLANG_ARGS": " ".join([*CPU_FLAGS, "--load-format", "dummy"]),
        "ARCHER_SGLANG_PORT": str(server_port),
        "ARCHER_ROUTER_PORT": str(router_port),
        "ARCHER_SGLANG_GPUS_PER_NODE": "1",
        "ARCHER_SGLANG_DTYPE": "float32",
        "ARCHER_SGLANG_MEM_FRACTION": str(CPU_MEM_FRACTION),
        "ARCHER_ROLLOUT_HEALTH_TIMEOUT": "400",
        "OMP_NUM_THREADS": "1",
    }
    out = []
    for k, v in flags.items():
        out += ["--env", f"{k}={v}"]
    return out


def key_on_a_command_line(key: str) -> list[str]:
    """Command lines of this machine's processes that contain `key`."""
    found = []
    for proc in Path("/proc").iterdir():
        try:
            cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if key in cmdline:
            found.append(cmdline)
    return found


def wildcard_listeners(job_id: str) -> list[tuple[str, int]]:
    """(command, port) of every TCP socket listening on 0.0.0.0 or :: that a process of
    Slurm job `job_id` whose command line names sglang holds (servers, their scheduler
    and detokenizer processes, the router; not the srun that started them, whose
    ports are Slurm's own)."""
    inodes: dict[str, str] = {}
    for proc in Path("/proc").iterdir():
        try:
            env = (proc / "environ").read_bytes().split(b"\0")
            cmd = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            sglang = ("sglang.launch_server", "sglang::", "sglang_router")
            if f"SLURM_JOB_ID={job_id}".encode() not in env or not any(m in cmd for m in sglang):
                continue
            if Path(cmd.split(" ", 1)[0]).name == "srun":  # Slurm's own (munge-authenticated)
                continue
            for fd in (proc / "fd").iterdir():
                link = os.readlink(fd)
                if link.startswith("socket:["):
                    inodes[link[8:-1]] = cmd[:120]
        except OSError:
            continue
    found = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            f = line.split()
            addr, port = f[1].split(":")
            if f[3] == "0A" and f[9] in inodes and set(addr) == {"0"}:  # LISTEN, any address
                found.append((inodes[f[9]], int(port, 16)))
    return found


def test_disaggregated_job_trains_syncs_is_preempted_requeues_and_finishes(
    cluster: SlurmCluster, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "disagg"
    logs = out / "logs"
    steps = 40  # enough that the job still runs when the checks below are done
    overrides = run_overrides(out, "rehearsal-disagg", steps)
    model = server_model(out, overrides)
    targets = tmp_path / "targets"
    targets.mkdir()
    prom = prometheus_with_file_sd(tmp_path / "prom", targets)
    try:
        server_port, router_port = free_port(), free_port()
        jid = submit(
            cluster, out,
            "--mode", "disaggregated", "--nodes", "2", "--rollout-nodes", "1",
            "--nproc-per-node", "2", "--sglang-model", str(model),
            *sglang_env_flags(server_port, router_port),
            "--env", f"ARCHER_PROM_TARGETS_DIR={targets}",
            "--env", f"ARCHER_METRICS_PORT={free_port()}",
            *overrides, capsys=capsys,
        )  # fmt: skip
        wait_until(lambda: len(metric_rows(out)) >= 1, 900, "the first trained step")
        # rank 0 wrote the job's file_sd target; Prometheus scraped the exporter through
        # it, and the dashboard's throughput and entropy panels have data for this job
        target = json.loads((targets / f"{jid}.json").read_text())
        assert target[0]["labels"] == {"run": "rehearsal-disagg", "slurm_job_id": jid}, target
        sel = f'run="rehearsal-disagg", slurm_job_id="{jid}"'
        wait_until(lambda: bool(prom.query(f"archer_step{{{sel}}}")), 60, "a scrape of rank 0")
        for title in ("Throughput (tokens/s)", "Entropy per token group"):
            for expr in dashboard_expr(title):
                q = expr.replace("$__rate_interval", "30s").replace("$run", "rehearsal-disagg")
                wait_until(lambda q=q: bool(prom.query(q)), 60, f"data for {title}: {q}")
        # the servers and router were started with the job's API key, on no command line
        key_file = logs / f".archer-secrets-{jid}" / "sglang_api_key.yaml"
        key = key_file.read_text().split(":", 1)[1].strip()
        assert len(key) == 64 and oct(key_file.stat().st_mode & 0o777) == "0o600"
        assert key_on_a_command_line(key) == []
        # and nothing of theirs listens beyond the node's address, except what SGLang
        # 0.5.23 does not let us bind: its scheduler joins its own torch.distributed group
        # (TP 1 here) through `tcp://<--host>:<nccl_port>` (model_runner.py), and torch
        # 2.13's TCPStore server may listen on every interface for that (docs/sglang.md;
        # /server_info reports nccl_port as null, so the process names it)
        wild = wildcard_listeners(jid)
        assert all(cmd.startswith("sglang::scheduler") for cmd, _ in wild), wild
        assert not {p for _, p in wild} & {server_port, router_port, router_port + 1}, wild
        server = f"http://127.0.0.1:{server_port}"
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(server + "/server_info", timeout=10)
        assert refused.value.code == 401
        # Pre-empt mid-run, as docs/slurm.md tells users: SIGUSR1 to the batch shell.
        sig = cluster.run(require_binary("scancel"), "--batch", "--signal=USR1", jid)
        assert sig.returncode == 0, sig.stderr
        signalled = time.monotonic()
        wait_until(lambda: "training step exited" in job_log(out, jid), 300, "the stop")
        stop_s = time.monotonic() - signalled
        requeue_now(cluster, jid, out, restarts=1)
        first_log = job_log(out, jid)
        first_run = [int(r["step"]) for r in metric_rows(out)]
        info = cluster.wait_job(jid, ("COMPLETED", "FAILED", "CANCELLED"), 900)
        log = job_log(out, jid)
        assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", log[-8000:]
    finally:
        prom.stop()
    rows = metric_rows(out)
    # no step trained twice, none skipped, across the two runs
    assert [int(r["step"]) for r in rows] == list(range(1, steps + 1)), log[-8000:]
    assert 1 <= len(first_run) < steps, f"the job ended before the pre-emption: {first_run}"
    k = first_run[-1]  # the step the first run saved on the signal
    for r in rows:
        # every rollout ran on the weights of the last distributed sync: the servers'
        # sampling log-probs equal the trainer's recomputation (fp32 both sides)
        assert r["rollout/logprob_abs_diff"] < 1e-5, r
        # (a step whose update was under way at the signal is saved without its sync;
        # the resumed run's initial sync sends those weights)
        assert r["sync/bytes"] > 0 or int(r["step"]) == k, r
        assert r["train/grad_norm"] > 0, r  # the update moved the weights it then synced
    # the trainer checkpointed the last completed step on the signal, within a bound,
    # while the servers ran: the job stopped them only after the training step exited
    assert f"received SIGUSR1: checkpoint written at step {k} " in first_log, first_log[-6000:]
    assert stop_s < 120, stop_s
    order = [first_log.index(m) for m in (
        "received SIGUSR1: asking the training step", f"checkpoint written at step {k} ",
        "training step exited", "requeueing job", "stopping the rollout servers and router",
    )]  # fmt: skip
    assert order == sorted(order), first_log[-6000:]
    assert f"resumed from {out / 'checkpoints'}/step_{k:08d} (step {k})" in log
    assert " is down" not in log, log[-8000:]
    # servers and router bound the node's address (NodeAddr 127.0.0.1), not 0.0.0.0; the
    # key is in no log, and its folder went with the job
    server_log = (logs / f"sglang-{jid}-node1-{server_port}.log").read_text()
    assert f"Uvicorn running on http://127.0.0.1:{server_port}" in server_log
    for path in logs.iterdir():
        if path.is_file():
            assert key not in path.read_text(errors="replace"), path
    assert not list(logs.glob(".archer-secrets-*"))
    assert not list(targets.iterdir())  # the target went with the run


def colocated_overrides(out: Path) -> list[str]:
    """What a colocated job on this machine sets beyond the job script's own (engine,
    mode, weight_sync=tensor): the SGLang venv's server and router as the programs the
    trainer launches, on SGLang's CPU path."""
    py = str(sglang_python())
    server = ["env", f"PYTHONPATH={SHIMS}", "SGLANG_USE_CPU_ENGINE=1", "OMP_NUM_THREADS=1",
              py, "-m", "sglang.launch_server"]  # fmt: skip
    flags = []
    for ov in (
        "rollout.sglang.num_servers=1",
        f"rollout.sglang.base_port={free_port()}",
        f"rollout.sglang.router_port={free_port()}",
        "rollout.sglang.router_policy=round_robin",
        "rollout.sglang.health_timeout_s=400",
        f"rollout.sglang.server_command={json.dumps(server)}",
        f"rollout.sglang.router_command={json.dumps([py, '-m', 'sglang_router.launch_router'])}",
        f"rollout.sglang.extra_server_args={json.dumps(list(CPU_FLAGS))}",
    ):
        flags += ["-o", ov]
    return flags


def test_colocated_job_is_preempted_requeues_finishes_evaluates_and_exports(
    cluster: SlurmCluster, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "coloc"
    steps = 12  # the job still runs when it is pre-empted after its first step
    overrides = [*run_overrides(out, "rehearsal-coloc", steps), *colocated_overrides(out)]
    jid = submit(
        cluster, out, "--mode", "colocated", "--nodes", "1", "--nproc-per-node", "2",
        *overrides, capsys=capsys,
    )  # fmt: skip
    wait_until(lambda: len(metric_rows(out)) >= 1, 900, "the first trained step")
    # Pre-empt as Slurm does with PreemptMode=REQUEUE (by hand: `scontrol requeue`):
    # SIGTERM to every process of the job, the servers the trainer launched included.
    # The trainer drops the rollout their exit broke, saves and exits within KillWait.
    req = cluster.scontrol("requeue", jid)
    assert req.returncode == 0, req.stderr
    requeue_now(cluster, jid, out, restarts=1)
    first_log = job_log(out, jid)
    first_run = [int(r["step"]) for r in metric_rows(out)]
    info = cluster.wait_job(jid, ("COMPLETED", "FAILED", "CANCELLED"), 900)
    log = job_log(out, jid)
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", log[-8000:]
    rows = metric_rows(out)
    assert [int(r["step"]) for r in rows] == list(range(1, steps + 1)), log[-8000:]
    assert 1 <= len(first_run) < steps, first_run
    for r in rows:
        assert r["rollout/logprob_abs_diff"] < 1e-5, r
        assert r["train/grad_norm"] > 0, r
    k = first_run[-1]
    assert f"received SIGTERM: checkpoint written at step {k} " in first_log, first_log[-6000:]
    assert f"resumed from {out / 'checkpoints'}/step_{k:08d} (step {k})" in log
    # `archer eval` of the final checkpoint (the run's own config, its held-out file)
    held_out = sorted((REPO_ROOT / ".cache/archer/warmstart").glob("synthetic-*-4096-*/eval.jsonl"))
    assert held_out, "the demo's held-out file (make demo writes it)"
    data = out / "held_out16.jsonl"
    data.write_text("".join(held_out[0].read_text().splitlines(keepends=True)[:16]))
    ov = [a for pair in zip(overrides[::2], overrides[1::2]) for a in pair]
    archer = [sys.executable, "-m", "archer_mcore.cli"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    ev = subprocess.run(
        [*archer, "eval", str(DEMO), "--checkpoint", str(out / "checkpoints"), "--data",
         str(data), "--samples", "2", "--out", str(out / "eval.json"), *ov],
        cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert ev.returncode == 0, ev.stderr[-4000:]
    got = json.loads((out / "eval.json").read_text())
    assert got["checkpoint"] == str(out / "checkpoints" / f"step_{steps:08d}")
    assert got["results"]["all"]["prompts"] == 16.0, got
    # `archer export` of it, loaded by a real SGLang server: the server's log-probs of
    # a fixed response equal transformers' own Qwen3 on the exported files
    hf = out / "hf"
    ex = subprocess.run(
        [*archer, "export", str(DEMO), "--checkpoint", str(out / "checkpoints"),
         "--out", str(hf), *ov],
        cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert ex.returncode == 0, ex.stderr[-4000:]
    check_export_in_real_server(hf, tmp_path / "export_server")


def check_export_in_real_server(hf: Path, work: Path) -> None:
    """Start a real SGLang server (fp32) on `hf` and compare its log-probs of a fixed
    prompt + response with transformers' model loaded from the same directory."""
    import torch
    from logprob_check import FP32_ATOL, server_logprobs
    from sglang_harness import RealServers
    from transformers import AutoModelForCausalLM

    cfg = json.loads((hf / "config.json").read_text())
    vocab = int(cfg["vocab_size"])
    prompt, response = [5, 17, 9, 30, 11], [12, 40, 7, 7, 21, 3]
    model = AutoModelForCausalLM.from_pretrained(hf, torch_dtype=torch.float32).eval()
    with torch.no_grad():
        logits = model(torch.tensor([prompt + response])).logits[0].double()
    logp = torch.log_softmax(logits, dim=-1)
    want = [float(logp[len(prompt) + i - 1, t]) for i, t in enumerate(response)]
    rs = RealServers(work / "logs", work / "kernel_calls.log")
    try:
        rs.start(hf, 1)
        got = server_logprobs(rs.urls[0], prompt, response, vocab_size=vocab)
    finally:
        rs.stop()
    assert len(got) == len(want)
    assert max(abs(a - b) for a, b in zip(got, want)) < FP32_ATOL, (got, want)
