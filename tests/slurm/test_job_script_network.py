"""slurm/archer_job.sh's network exposure (issue 22 item 5), without Slurm: the script
runs under bash with stand-in `scontrol` (two nodes, NodeAddr 10.0.0.1 / 10.0.0.2) and
`srun` (records each step's command line and the mode of the file after `--config`,
then exits), so every flag the real steps would get can be read back.

* The rank-0 metrics exporter (ARCHER_PROM_TARGETS_DIR set) listens on the training
  node's address, not 0.0.0.0.
* Disaggregated: servers and router listen on their node's address, servers read the
  job's key from a 0600 file (`--config`), a `PYTHON -m` router gets it through the
  wrapper (the same program as sglang_launcher.ROUTER_KEY_WRAPPER), no command line
  carries the key, the trainer is pointed at the file, and the folder is gone at exit.
"""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

from archer_mcore.rollout.sglang_launcher import ROUTER_KEY_WRAPPER

REPO = Path(__file__).resolve().parents[2]
JOB = REPO / "slurm" / "archer_job.sh"
SCONTROL = """#!/bin/bash
case "$1 $2" in
  "show hostnames") tr ',' '\\n' <<<"$3" ;;
  "show node") echo "NodeName=$3 NodeAddr=10.0.0.${3#node} State=IDLE" ;;
esac
"""
SRUN = """#!/bin/bash
out="$STUB_DIR/srun.$(date +%s%N).$$"
args=("$@")
for ((i = 0; i < ${#args[@]}; i++)); do
  if [ "${args[i]}" = --config ]; then stat -c %a "${args[i+1]}" >"$out.mode"; fi
done
env >"$out.env"
printf '%s\\0' "$@" >"$out.tmp" && mv "$out.tmp" "$out"
exit 0
"""
#: ARCHER_PYTHON: its health probes (`-c ... URL`) pass once server and router steps are
#: recorded (the background srun stand-ins could otherwise still be starting when the
#: job ends and kills them).
PYTHON = """#!/bin/bash
until [ "$(find "$STUB_DIR" -name 'srun.*' ! -name '*.mode' ! -name '*.tmp' ! -name '*.env' | wc -l)" -ge 2 ]; do
  sleep 0.05
done
"""


def _run_job(tmp_path: Path, mode: str, **env: str) -> list[list[str]]:
    """Run the job script with the stand-ins; the recorded srun command lines, each
    followed by the names of the variables srun had ("ENV:NAME" items)."""
    stub = tmp_path / "stub"
    stub.mkdir()
    for name, text in (("scontrol", SCONTROL), ("srun", SRUN), ("python", PYTHON)):
        (stub / name).write_text(text)
        (stub / name).chmod(0o755)
    cfg = tmp_path / "c.yaml"
    cfg.write_text("train:\n  run_name: net\n")
    full_env = {
        "PATH": f"{stub}:/usr/bin:/bin", "STUB_DIR": str(stub), "SLURM_JOB_ID": "4242",
        "SLURM_JOB_NODELIST": "node1,node2", "ARCHER_CONFIG": str(cfg), "ARCHER_MODE": mode,
        "ARCHER_HOME": str(REPO), "ARCHER_LOG_DIR": str(tmp_path / "logs"),
        "ARCHER_PYTHON": str(stub / "python"), "ARCHER_NPROC_PER_NODE": "1", **env,
    }  # fmt: skip
    (tmp_path / "logs").mkdir()
    r = subprocess.run(["bash", str(JOB)], env=full_env, capture_output=True, text=True,
                       timeout=120)  # fmt: skip
    assert r.returncode == 0, r.stdout + r.stderr
    calls = sorted(p for p in stub.glob("srun.*") if p.suffix not in (".mode", ".tmp", ".env"))
    return [p.read_text().split("\0")[:-1] + _env_names(Path(f"{p}.env")) for p in calls]


def _env_names(path: Path) -> list[str]:
    return ["ENV:" + line.split("=", 1)[0] for line in path.read_text().splitlines() if "=" in line]


def _after(argv: list[str], flag: str) -> str:
    return argv[argv.index(flag) + 1]


@pytest.mark.timeout(180)
def test_metrics_exporter_listens_on_rank_0s_own_address(tmp_path: Path) -> None:
    # torchrun may place rank 0 on any training node: the script no longer names the
    # first node's address (10.0.0.1 here) but has rank 0 bind its own (metrics.host=
    # auto, tests/monitoring/test_exporter_targets.py) and write the file_sd target
    calls = _run_job(tmp_path, "train", ARCHER_PROM_TARGETS_DIR=str(tmp_path / "prom"))
    [train] = calls
    overrides = [train[i + 1] for i, a in enumerate(train) if a == "-o"]
    assert "metrics.host=auto" in overrides, overrides
    assert f"metrics.targets_dir={tmp_path / 'prom'}" in overrides, overrides
    assert not any("0.0.0.0" in a or a.startswith("metrics.host=10.") for a in train)
    assert not list((tmp_path / "prom").iterdir())  # the trainer writes it, not the script


@pytest.mark.timeout(180)
def test_disaggregated_servers_and_router_bind_the_node_address_with_the_job_key(
    tmp_path: Path,
) -> None:
    calls = _run_job(tmp_path, "disaggregated", ARCHER_ROLLOUT_NODES="1",
                     ARCHER_SGLANG_MODEL="/m")  # fmt: skip
    [server] = [c for c in calls if "--model-path" in c]
    [router] = [c for c in calls if "--worker-urls" in c]
    [train] = [c for c in calls if "torch.distributed.run" in c]
    modes = sorted(p.read_text().strip() for p in (tmp_path / "stub").glob("*.mode"))
    assert modes == ["600"]  # the server's --config file, while the job ran
    key_file = _after(server, "--config")
    assert _after(server, "--host") == "10.0.0.1" and "0.0.0.0" not in server
    # the router: `$ARCHER_PYTHON -m sglang_router.launch_router` through the wrapper
    i = router.index("-c")
    assert router[i - 1 : i + 4] == [str(tmp_path / "stub" / "python"), "-c", ROUTER_KEY_WRAPPER, key_file,
                                     "sglang_router.launch_router"]  # fmt: skip
    assert _after(router, "--host") == "10.0.0.1" and "--api-key" not in router
    # the router's own metrics: its node address, the port after its own (not 0.0.0.0:29000)
    assert _after(router, "--prometheus-host") == "10.0.0.1"
    assert _after(router, "--prometheus-port") == "30101"
    overrides = [train[i + 1] for i, a in enumerate(train) if a == "-o"]
    assert f"rollout.sglang.api_key_file={key_file}" in overrides
    assert "rollout.sglang.router_url=http://10.0.0.1:30100" in overrides
    # rank 0 finds the address it advertises where torchrun puts it: no guess passed
    assert not any(o.startswith("rollout.sglang.master_address") for o in overrides)
    # the trainer's CUDA_DEVICE_MAX_CONNECTIONS and rendezvous address reach the training
    # step only
    kept = {"ENV:CUDA_DEVICE_MAX_CONNECTIONS", "ENV:MASTER_ADDR", "ENV:MASTER_PORT"}
    assert kept <= set(train)
    assert not kept & set(server) and not kept & set(router)
    # no 64-hex key on any command line; the secrets folder is removed at exit
    for argv in calls:
        assert not any(re.search(r"[0-9a-f]{64}", a) for a in argv), argv
    assert not Path(key_file).exists() and not Path(key_file).parent.exists()
    for log in (tmp_path / "logs").iterdir():
        assert not re.search(r"[0-9a-f]{64}", log.read_text()), log


@pytest.mark.timeout(180)
def test_servers_on_one_node_start_on_their_own_gpus(tmp_path: Path) -> None:
    """Issue 27 item 4: two TP=2 servers on one node get --base-gpu-id 0 and 2, counted
    in the CUDA_VISIBLE_DEVICES their srun step sets itself (a step with GPU GRES does;
    a value exported outside the step was replaced, so both took GPUs 0-1). SGLang
    0.5.23's `base_gpu_id` (srt/arg_groups/fields/device.py)."""
    calls = _run_job(tmp_path, "disaggregated", ARCHER_ROLLOUT_NODES="1",
                     ARCHER_SGLANG_MODEL="/m", ARCHER_SGLANG_GPUS_PER_NODE="4",
                     ARCHER_SGLANG_TP="2")  # fmt: skip
    servers = sorted((c for c in calls if "--model-path" in c), key=lambda c: _after(c, "--port"))
    assert [_after(c, "--base-gpu-id") for c in servers] == ["0", "2"]
    assert [_after(c, "--tp-size") for c in servers] == ["2", "2"]
    assert all("ENV:CUDA_VISIBLE_DEVICES" not in c for c in servers)
