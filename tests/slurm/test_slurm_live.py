"""Real Slurm (slurmctld + two slurmd "nodes" on 127.0.0.1, munge auth) runs the
rendered sbatch scripts with the real trainer (`archer train configs/demo_cpu.yaml
--resume`, the scripts' default entry): DP=2 over two nodes with metrics pushed, and a
pre-empted job that checkpoints, requeues and resumes. The SGLang modes (real servers,
router, torchrun with 2 ranks, Prometheus through file_sd, pre-emption) are
tests/cluster/test_rehearsal.py.

One STAND-IN is left: tests/slurm/standin_payload.py in
`test_time_limit_signal_checkpoints_requeues_and_finishes`, which tests Slurm's own
time-limit timer (the rendered `#SBATCH --signal=B:USR1@45`). That timer fires anywhere
in the first 45 s of a 1-minute job here, and the real trainer needs 20-40 s on this
2-core machine before its first step, so most runs would end before any step; the
payload has the trainer's command line and its checkpoint-on-signal / resume contract
(its docstring), with 0.3 s steps. The real trainer's signal -> checkpoint -> requeue ->
resume is tested by `test_demo_preempted_checkpoints_requeues_and_resumes` and the
rehearsal.
"""

from __future__ import annotations

import json
import re
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from services import (
    REPO_ROOT,
    Prometheus,
    Pushgateway,
    SlurmCluster,
    prometheus_config_for_test,
    require_binary,
    wait_until,
)

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]

HERE = Path(__file__).resolve().parent
PAYLOAD = HERE / "standin_payload.py"


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SlurmCluster]:
    require_binary("slurmctld")
    # 4 GPUs per node as a GRES (character-device files, tests/services.py)
    c = SlurmCluster(tmp_path_factory.mktemp("slurm"), nodes=("node1", "node2"), gpus_per_node=4)
    try:
        yield c
    finally:
        c.stop()


def write_config(path: Path, run_name: str, steps: int, extra: str = "") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(
        f"train:\n  run_name: {run_name}\n  steps: {steps}\n  output_dir: {path.parent / 'out'}\n"
        f"slurm:\n  gpus_per_node: 0\n{extra}"
    )
    return path


def submit(
    cluster: SlurmCluster, config: Path, *flags: str, capsys: pytest.CaptureFixture[str]
) -> tuple[int, str]:
    """`archer submit` against the test cluster; (exit code, printed text)."""
    rc = cluster.archer_submit(
        [
            str(config),
            "--log-dir",
            str(config.parent / "logs"),
            "--home",
            str(REPO_ROOT),
            "--python",
            sys.executable,
            "--entry",
            str(PAYLOAD),
            "--gpus-per-node",
            "0",
            "--time",
            "10:00",
            "--signal-lead",
            "60",
            *flags,
        ]
    )
    out = capsys.readouterr()
    return rc, out.out + out.err


def job_id_of(text: str) -> str:
    m = re.search(r"Submitted batch job (\d+)", text)
    assert m, text
    return m.group(1)


def job_log(config: Path, job_id: str) -> str:
    logs = list((config.parent / "logs").glob(f"*-{job_id}.out"))
    return logs[0].read_text() if logs else ""


def payload_lines(log: str, pattern: str) -> list[re.Match[str]]:
    """Matches of `pattern` in each payload message. Two ranks printing at once can put
    two messages on one log line, so messages are split at their "payload rank=" prefix
    (and cut at the end of their line), not at newlines."""
    messages = (m.split("\n", 1)[0] for m in re.split(r"(?=payload rank=)", log))
    return [m for msg in messages if (m := re.search(pattern, msg))]


def test_slurm_accepts_every_rendered_script(
    cluster: SlurmCluster, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cfg = write_config(tmp_path / "c.yaml", "accept", 1, "model:\n  path: /models/none\n")
    for flags in (
        ("--mode", "train", "--nodes", "2"),
        ("--mode", "colocated", "--nodes", "1"),
        ("--mode", "disaggregated", "--nodes", "2", "--rollout-nodes", "1"),
    ):
        rc, text = submit(cluster, cfg, *flags, "--test-only", capsys=capsys)
        assert rc == 0, f"{flags}: {text}"
        assert "to start at" in text, text  # sbatch --test-only's verdict
    # and Slurm rejects what this cluster cannot run (3 nodes), so the check is real
    rc, text = submit(cluster, cfg, "--mode", "train", "--nodes", "3", "--test-only", capsys=capsys)
    assert rc != 0, text


def test_rollout_servers_get_distinct_gpus_under_a_gpu_gres(
    cluster: SlurmCluster, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Issue 27 item 4 on real Slurm with a GPU GRES (4 per node): two TP=2 servers on
    the rollout node run in steps of their own, whose CUDA_VISIBLE_DEVICES Slurm's gres
    plugin sets (the node's 4 job GPUs; a value exported to the job is replaced), and
    `--base-gpu-id` 0 and 2 put them on GPUs 0-1 and 2-3. The "server" is a probe that
    writes what its step got and sleeps: it answers no /health, so the job stops after
    ARCHER_ROLLOUT_HEALTH_TIMEOUT and no trainer starts."""
    probe_dir = tmp_path / "probe"
    probe_dir.mkdir()
    probe = tmp_path / "probe.sh"
    probe.write_text(
        '#!/bin/sh\necho "CVD=$CUDA_VISIBLE_DEVICES ARGS=$*" > "$PROBE_DIR/$$.txt"\n'
        "exec sleep 300\n"
    )
    probe.chmod(0o755)
    cfg = write_config(tmp_path / "run" / "c.yaml", "slurm-gres", 1, "model:\n  path: /m\n")
    rc, text = submit(
        cluster, cfg,
        "--mode", "disaggregated", "--nodes", "2", "--rollout-nodes", "1",
        "--gpus-per-node", "4", "--nproc-per-node", "1",
        "--env", f"ARCHER_SGLANG_SERVER_CMD={probe}", "--env", "ARCHER_SGLANG_TP=2",
        "--env", "ARCHER_SGLANG_GPUS_PER_NODE=4", "--env", "ARCHER_ROLLOUT_HEALTH_TIMEOUT=20",
        "--env", f"PROBE_DIR={probe_dir}", "--env", "CUDA_VISIBLE_DEVICES=3",
        capsys=capsys,
    )  # fmt: skip
    assert rc == 0, text
    assert "#SBATCH --gpus-per-node=4" in next((cfg.parent / "logs").glob("*.sbatch")).read_text()
    jid = job_id_of(text)
    info = cluster.wait_job(jid, ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT"), 180)
    log = job_log(cfg, jid)
    assert info["JobState"] == "FAILED" and "not healthy after 20s" in log, (info, log)
    seen = sorted(p.read_text().split() for p in probe_dir.glob("*.txt"))
    assert len(seen) == 2, seen
    for words in seen:
        assert words[0] == "CVD=0,1,2,3", words
    bases = sorted(int(w[w.index("--base-gpu-id") + 1]) for w in seen)
    assert bases == [0, 2]
    assert all(w[w.index("--tp-size") + 1] == "2" for w in seen)


def test_time_limit_signal_checkpoints_requeues_and_finishes(
    cluster: SlurmCluster, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """No manual signal: the rendered `#SBATCH --signal=B:USR1@45` with a 1-minute limit
    makes Slurm itself warn the job. Slurm's timer may send the signal up to ~60 s early,
    i.e. anywhere in the first 45 s of a run, even before the workers exist: such a run
    dies without a checkpoint and the next one resumes from the last checkpoint. The
    payload needs ~52 s, so the first run is always cut short; later runs may be too."""
    steps = 160
    cfg = write_config(tmp_path / "run" / "c.yaml", "slurm-timelimit", steps)
    rc, text = submit(
        cluster,
        cfg,
        "--mode",
        "train",
        "--nodes",
        "1",
        "--nproc-per-node",
        "2",
        "--time",
        "1",
        "--signal-lead",
        "45",
        "--env",
        "STANDIN_STEP_SECONDS=0.3",
        capsys=capsys,
    )
    assert rc == 0, text
    jid = job_id_of(text)
    assert "#SBATCH --signal=B:USR1@45" in next((cfg.parent / "logs").glob("*.sbatch")).read_text()
    restarts = 0
    deadline = time.monotonic() + 400
    while True:
        assert time.monotonic() < deadline, job_log(cfg, jid)
        info = cluster.job(jid)
        if info["JobState"] in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL"):
            break
        if info["JobState"] == "PENDING" and int(info["Restarts"]) > restarts:
            restarts = int(info["Restarts"])
            wait_until(cluster.nodes_idle, 60, "the previous run's steps to finish")
            time.sleep(2)  # see test_preempted_job_...: skip Slurm's requeue hold
            assert cluster.scontrol("update", f"JobId={jid}", "StartTime=now").returncode == 0
        time.sleep(0.5)
    log = job_log(cfg, jid)
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", log
    restarts = int(info["Restarts"])  # Slurm's count, in case a requeue went unseen
    assert restarts >= 1, log
    runs: dict[int, dict[str, list[int]]] = {
        r: {"steps": [], "saved": [], "resumed": []} for r in range(restarts + 1)
    }
    for kind, pattern in (
        ("steps", r"rank=0 .*restart=(\d+) step (\d+)$"),
        ("saved", r"rank=0 .*restart=(\d+) checkpoint saved at step (\d+) on"),
        ("resumed", r"rank=0 .*restart=(\d+) resumed from step (\d+)"),
    ):
        for m in payload_lines(log, pattern):
            runs[int(m.group(1))][kind].append(int(m.group(2)))
    checkpoint = 0  # each run continues from the last checkpoint written before it
    for r in range(restarts + 1):
        run = runs[r]
        assert run["resumed"] == ([checkpoint] if checkpoint else []), (r, run)
        end = run["saved"][0] if run["saved"] else (steps if r == restarts else None)
        if end is None:  # signalled before it could checkpoint: may have done a few steps
            assert run["steps"] == list(range(checkpoint, checkpoint + len(run["steps"])))
        else:
            assert run["steps"] == list(range(checkpoint, end)), (r, run)
            checkpoint = end
    assert checkpoint == steps
    assert any(run["saved"] for run in runs.values()), "no run checkpointed on the signal"
    assert json.loads((cfg.parent / "out" / "result.json").read_text())["final_step"] == steps


# ----------------------------------------------------------------------------------
# The real trainer: `archer train configs/demo_cpu.yaml --resume` (the scripts' default
# entry), shrunk by overrides to a few small steps.
DEMO = REPO_ROOT / "configs" / "demo_cpu.yaml"


def demo_overrides(out: Path, steps: int) -> list[str]:
    flags = []
    for ov in (
        f"train.steps={steps}",
        f"train.output_dir={out}",
        "train.prompts_per_step=4",
        "train.mini_batch_prompts=2",
        "eval.every=0",
        "warmstart.steps=0",
        # private data cache: the shared .cache/ may be rewritten by other runs meanwhile
        f"warmstart.cache_dir={out / 'cache'}",
        "checkpoint.save_every=0",
        # grpo (no group filter) updates every step; with the demo's Archer preset and
        # an untrained model every group is filtered and steps end early (see report)
        "algorithm.name=grpo",
    ):
        flags += ["-o", ov]
    return flags


def submit_demo(
    cluster: SlurmCluster, out: Path, *flags: str, capsys: pytest.CaptureFixture[str]
) -> tuple[int, str]:
    rc = cluster.archer_submit(
        [
            str(DEMO),
            "--log-dir",
            str(out / "logs"),
            "--home",
            str(REPO_ROOT),
            "--python",
            sys.executable,
            "--gpus-per-node",
            "0",
            "--time",
            "10:00",
            "--signal-lead",
            "60",
            *flags,
        ]
    )
    captured = capsys.readouterr()
    return rc, captured.out + captured.err


def demo_log(out: Path, job_id: str) -> str:
    logs = list((out / "logs").glob(f"*-{job_id}.out"))
    return logs[0].read_text() if logs else ""


def demo_steps(out: Path) -> list[int]:
    path = out / "metrics.jsonl"
    if not path.exists():
        return []
    return [int(json.loads(line)["step"]) for line in path.read_text().splitlines() if line]


def test_demo_config_dp2_job_exits_0_with_metrics_pushed(
    cluster: SlurmCluster, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    pgw = Pushgateway(tmp_path / "pgw")
    prom = None
    try:
        prom = Prometheus(
            tmp_path / "prom", prometheus_config_for_test([], f"127.0.0.1:{pgw.port}", [])
        )
        out = tmp_path / "demo"
        rc, text = submit_demo(
            cluster,
            out,
            "--mode",
            "train",
            "--nodes",
            "2",
            "--nproc-per-node",
            "1",
            "--pushgateway",
            pgw.url,
            *demo_overrides(out, 6),
            capsys=capsys,
        )
        assert rc == 0, text
        jid = job_id_of(text)
        info = cluster.wait_job(jid, ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT"), 400)
        log = demo_log(out, jid)
        assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", log
        assert "train nodes node1 node2 x 1 procs" in log
        assert demo_steps(out) == list(range(1, 7)), log
        # pushed while running (the trainer deletes its group at the clean exit)
        series = prom.query(f'max_over_time(archer_steps_total{{slurm_job_id="{jid}"}}[10m])')
        assert len(series) == 1 and series[0]["metric"]["run"] == "demo_cpu", series
        assert float(series[0]["value"][1]) >= 1
    finally:
        if prom is not None:
            prom.stop()
        pgw.stop()


def test_demo_preempted_checkpoints_requeues_and_resumes(
    cluster: SlurmCluster, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "demo"
    steps = 40
    rc, text = submit_demo(
        cluster,
        out,
        "--mode",
        "train",
        "--nodes",
        "1",
        "--nproc-per-node",
        "2",
        *demo_overrides(out, steps),
        capsys=capsys,
    )
    assert rc == 0, text
    jid = job_id_of(text)
    wait_until(lambda: len(demo_steps(out)) >= 3, 300, "three demo steps")
    sig = cluster.run(require_binary("scancel"), "--batch", "--signal=USR1", jid)
    assert sig.returncode == 0, sig.stderr
    info = cluster.wait_job(jid, ("PENDING", "COMPLETED", "FAILED"), 180)
    assert info["JobState"] == "PENDING" and info["Restarts"] == "1", (info, demo_log(out, jid))
    first_run = demo_steps(out)
    assert 3 <= len(first_run) < steps, first_run
    wait_until(cluster.nodes_idle, 60, "the first run's steps to finish")
    time.sleep(2)
    assert cluster.scontrol("update", f"JobId={jid}", "StartTime=now").returncode == 0
    info = cluster.wait_job(jid, ("COMPLETED", "FAILED", "CANCELLED"), 400)
    log = demo_log(out, jid)
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", log
    # the second run continued after the checkpointed step: no step twice, none missing
    assert demo_steps(out) == list(range(1, steps + 1)), log
