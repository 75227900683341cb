"""The weight-update group's network side (issue 22 item 6, issue 27 item 1).

* Under real torchrun (2 ranks, gloo; every worker has TORCHELASTIC_USE_AGENT_STORE=True)
  trainer rank 0 forms the group with a plain process joining as rank 1, as SGLang's TP
  worker does, and a broadcast arrives (torch's `rendezvous("tcp://...")` built a
  client-only store under torchrun: nothing listened and both sides timed out).
* The rendezvous store listens on the advertised master address only, not on every
  interface.
* Servers and the router the trainer launches get none of torchrun's variables.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from archer_mcore.rollout.sglang_launcher import (
    TORCHRUN_ENV_PREFIXES,
    TORCHRUN_ENV_VARS,
    ManagedProcess,
    SGLangServerArgs,
    free_port,
    server_env,
)
from archer_mcore.rollout.weight_sync import destroy_weight_update_group, init_weight_update_group

REPO = Path(__file__).resolve().parents[2]
PEER = Path(__file__).resolve().parent / "weight_group_peer.py"
SENT = [1.5 * k for k in range(6)]
#: What torchrun (and the Slurm script) put into a trainer's environment.
TORCHRUN_LIKE = {
    "TORCHELASTIC_USE_AGENT_STORE": "True", "TORCHELASTIC_RUN_ID": "job1",
    "TORCHELASTIC_RESTART_COUNT": "0", "TORCHELASTIC_MAX_RESTARTS": "0",
    "MASTER_ADDR": "10.0.0.1", "MASTER_PORT": "29500", "RANK": "0", "LOCAL_RANK": "0",
    "WORLD_SIZE": "8", "LOCAL_WORLD_SIZE": "8", "GROUP_RANK": "0", "GROUP_WORLD_SIZE": "1",
    "ROLE_RANK": "0", "ROLE_WORLD_SIZE": "8", "ROLE_NAME": "default",
    "CUDA_DEVICE_MAX_CONNECTIONS": "1",
}  # fmt: skip


def _plain_env() -> dict[str, str]:
    """This process's environment without torchrun's variables (a plain process)."""
    env = {k: v for k, v in os.environ.items() if k not in TORCHRUN_LIKE}
    env["PYTHONPATH"] = str(REPO)
    env["OMP_NUM_THREADS"] = "1"
    return env


def _spawn(argv: list[str], cwd: Path, log_name: str) -> subprocess.Popen[bytes]:
    """A plain child process in its own session, output to cwd/log_name."""
    with open(cwd / log_name, "wb") as log:
        return subprocess.Popen(argv, env=_plain_env(), cwd=cwd, start_new_session=True,
                                stdout=log, stderr=subprocess.STDOUT)  # fmt: skip


def _stop(proc: subprocess.Popen[bytes]) -> None:
    """Kill a test child's process group (started with start_new_session) by its pid."""
    if proc.poll() is None:
        os.killpg(proc.pid, 9)
        proc.wait(10)


def _listeners(port: int) -> list[str]:
    """Local addresses (hex, as in /proc/net/tcp*) in LISTEN state on `port`."""
    out = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            addr, port_hex = fields[1].rsplit(":", 1)
            if fields[3] == "0A" and int(port_hex, 16) == port:
                out.append(f"{table.rsplit('/', 1)[1]}:{addr}")
    return out


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_weight_group_forms_under_torchrun(tmp_path: Path) -> None:
    port, group = free_port(), "weight_update_group"
    common = ["127.0.0.1", str(port), group]
    trainer = _spawn(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
         str(PEER), "trainer", *common, str(tmp_path / "trainer.json"), "60"],
        tmp_path, "trainer.log",
    )  # fmt: skip
    joiner = _spawn(
        [sys.executable, str(PEER), "joiner", *common, str(tmp_path / "joiner.json"), "60"],
        tmp_path, "joiner.log",
    )  # fmt: skip
    try:
        trainer.wait(180)
        joiner.wait(60)
    finally:
        _stop(trainer)
        _stop(joiner)
    logs = {p.name: p.read_text()[-3000:] for p in tmp_path.glob("*.json")}
    logs["trainer.log"] = (tmp_path / "trainer.log").read_text()[-3000:]
    rank0 = json.loads((tmp_path / "trainer_rank0.json").read_text())
    assert rank0["agent_store"] == "True", logs  # really under torchrun
    assert rank0["ok"], logs
    got = json.loads((tmp_path / "joiner.json").read_text())
    assert got["ok"] and got["received"] == SENT, logs
    assert trainer.returncode == 0 and joiner.returncode == 0, logs


@pytest.mark.timeout(120)
def test_rendezvous_listens_on_the_master_address_only(tmp_path: Path) -> None:
    """With master address 127.0.0.1 the store accepts connections on loopback only
    (torch's own rendezvous binds its TCPStore server to every interface)."""
    port = free_port()
    result: dict[str, object] = {}

    def rank0() -> None:
        try:
            result["pg"] = init_weight_update_group(
                backend="gloo", master_address="127.0.0.1", master_port=port, rank=0,
                world_size=2, group_name="wg_bind_test", timeout_s=60,
            )  # fmt: skip
        except Exception as e:  # reported by the assertions below
            result["error"] = e

    t = threading.Thread(target=rank0, daemon=True)
    t.start()
    deadline = time.monotonic() + 30
    while not (seen := _listeners(port)) and time.monotonic() < deadline:
        time.sleep(0.05)
    joiner = _spawn(
        [sys.executable, str(PEER), "joiner", "127.0.0.1", str(port), "wg_bind_test",
         str(tmp_path / "joiner.json"), "60"],
        tmp_path, "joiner.log",
    )  # fmt: skip
    try:
        assert seen == ["tcp:0100007F"], f"listening on {seen} (want 127.0.0.1 only)"
        t.join(60)
        assert "error" not in result and "pg" in result, result
        import torch
        import torch.distributed as dist

        dist.broadcast(torch.tensor(SENT), src=0, group=result["pg"])
        joiner.wait(60)
        got = json.loads((tmp_path / "joiner.json").read_text())
        assert got["received"] == SENT, (tmp_path / "joiner.log").read_text()
    finally:
        _stop(joiner)
        if "pg" in result:
            destroy_weight_update_group(result["pg"])


def test_launched_processes_get_no_torchrun_variables(tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    """A server (server_env) and the router (ManagedProcess with env None, as
    SGLangEngine.launch starts it) launched from a torchrun worker inherit none of
    torchrun's variables nor CUDA_DEVICE_MAX_CONNECTIONS; other variables pass."""
    for k, v in TORCHRUN_LIKE.items():
        monkeypatch.setenv(k, v)
    monkeypatch.setenv("ARCHER_KEEP_ME", "1")
    dump = "import json, os, sys; open(sys.argv[1], 'w').write(json.dumps(dict(os.environ)))"
    args = SGLangServerArgs(model_path="m", port=free_port(), env=(("EXTRA", "x"),))
    procs = [
        ManagedProcess([sys.executable, "-c", dump, str(tmp_path / "server.json")],
                       server_env(args), tmp_path / "server.log"),
        ManagedProcess([sys.executable, "-c", dump, str(tmp_path / "router.json")],
                       None, tmp_path / "router.log"),
    ]  # fmt: skip
    for p in procs:
        p.start()
    for p in procs:
        assert p.proc is not None and p.proc.wait(60) == 0, p.log_tail()
    for name in ("server.json", "router.json"):
        env = json.loads((tmp_path / name).read_text())
        leaked = sorted(k for k in env if k in TORCHRUN_LIKE or k.startswith("TORCHELASTIC_"))
        assert leaked == [], f"{name}: {leaked}"
        assert env["ARCHER_KEEP_ME"] == "1"
    assert json.loads((tmp_path / "server.json").read_text())["EXTRA"] == "x"
    assert set(TORCHRUN_LIKE) <= {k for k in TORCHRUN_LIKE
                                  if k in TORCHRUN_ENV_VARS or k.startswith(TORCHRUN_ENV_PREFIXES)}
