"""Real servers for the integration tests: Prometheus, Pushgateway, munge, Slurm.

Each server runs from the Debian package's binary on 127.0.0.1 with free ports and
all state in a temp dir, is started as a child process and stopped by its pid
(SIGTERM, then SIGKILL). Binaries come from scripts/install_services.sh. A missing
binary skips the test, except under CI=true where it fails: CI must run them.

Import from a test directory's conftest with `sys.path.insert(0, <tests dir>)`.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]

# Debian installs daemons under /usr/sbin, which a non-root PATH may lack.
_EXTRA_BIN_DIRS = ("/usr/sbin", "/usr/bin", "/sbin")


def require_binary(name: str) -> str:
    """Absolute path of `name`; pytest.fail under CI=true when missing, else skip."""
    path = shutil.which(name)
    if path is None:
        for d in _EXTRA_BIN_DIRS:
            cand = Path(d) / name
            if cand.is_file() and os.access(cand, os.X_OK):
                path = str(cand)
                break
    if path is None:
        msg = f"{name} not installed (run scripts/install_services.sh)"
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(msg + "; CI=true requires it")
        pytest.skip(msg)
    return path


def free_port() -> int:
    """A TCP port that was free on 127.0.0.1 a moment ago."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_until(cond: Callable[[], bool], timeout: float, what: str, interval: float = 0.2) -> None:
    """Poll `cond` until true; raise TimeoutError naming `what` after `timeout` s."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if cond():
                return
        except (OSError, urllib.error.URLError, ValueError):
            pass
        time.sleep(interval)
    raise TimeoutError(f"timed out after {timeout:.0f} s waiting for {what}")


def http_get(url: str, timeout: float = 10.0) -> bytes:
    with urllib.request.urlopen(url, timeout=timeout) as resp:
        return resp.read()


class ManagedProcess:
    """A daemon started in the foreground as our child; stopped by its pid."""

    def __init__(
        self,
        name: str,
        argv: list[str],
        log_path: Path,
        env: dict[str, str] | None = None,
        cwd: Path | None = None,
    ) -> None:
        self.name = name
        self.log_path = log_path
        self._log = open(log_path, "ab")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            argv,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            env=env,
            cwd=cwd,
            start_new_session=True,
        )

    @property
    def pid(self) -> int:
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc.poll() is None

    def log_tail(self, n: int = 40) -> str:
        try:
            lines = self.log_path.read_text(errors="replace").splitlines()
        except OSError:
            return ""
        return "\n".join(lines[-n:])

    def stop(self, timeout: float = 15.0) -> None:
        """SIGTERM the pid, wait, SIGKILL if still there."""
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                os.kill(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)
        self._log.close()


# --------------------------------------------------------------------------- Prometheus
class Prometheus:
    """A real Prometheus on 127.0.0.1 with its TSDB in `workdir`."""

    def __init__(self, workdir: Path, config: dict[str, Any]) -> None:
        binary = require_binary("prometheus")
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        workdir.mkdir(parents=True, exist_ok=True)
        self.config_path = workdir / "prometheus.yml"
        import yaml

        self.config_path.write_text(yaml.safe_dump(config, sort_keys=False))
        self.process = ManagedProcess(
            "prometheus",
            [
                binary,
                f"--config.file={self.config_path}",
                f"--storage.tsdb.path={workdir / 'tsdb'}",
                f"--web.listen-address=127.0.0.1:{self.port}",
                "--storage.tsdb.retention.time=1h",
            ],
            workdir / "prometheus.log",
            cwd=workdir,
        )
        try:
            wait_until(
                lambda: http_get(self.url + "/-/ready").startswith(b"Prometheus"),
                60,
                "prometheus /-/ready",
            )
        except TimeoutError:
            self.process.stop()
            raise RuntimeError("prometheus did not start:\n" + self.process.log_tail()) from None

    def api(self, path: str, **params: str) -> Any:
        """GET /api/v1/<path>; return `data`, raising with Prometheus's error text."""
        url = f"{self.url}/api/v1/{path}"
        if params:
            url += "?" + urllib.parse.urlencode(params)
        try:
            body = json.loads(http_get(url))
        except urllib.error.HTTPError as exc:
            body = json.loads(exc.read() or b"{}")
            raise ValueError(f"prometheus {path} {params}: {body.get('error', exc)}") from None
        if body.get("status") != "success":
            raise ValueError(f"prometheus {path} {params}: {body}")
        return body["data"]

    def query(self, expr: str) -> list[dict[str, Any]]:
        """Instant query; the result vector (a scalar result becomes one sample)."""
        data = self.api("query", query=expr)
        if data["resultType"] in ("scalar", "string"):
            return [{"metric": {}, "value": data["result"]}]
        return list(data["result"])

    def stop(self) -> None:
        self.process.stop()


class Pushgateway:
    """A real Prometheus Pushgateway on 127.0.0.1 (in-memory, no persistence)."""

    def __init__(self, workdir: Path) -> None:
        binary = require_binary("prometheus-pushgateway")
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        workdir.mkdir(parents=True, exist_ok=True)
        self.process = ManagedProcess(
            "pushgateway",
            [binary, f"--web.listen-address=127.0.0.1:{self.port}"],
            workdir / "pushgateway.log",
            cwd=workdir,
        )
        try:
            wait_until(
                lambda: http_get(self.url + "/-/ready") is not None, 30, "pushgateway /-/ready"
            )
        except TimeoutError:
            self.process.stop()
            raise RuntimeError("pushgateway did not start:\n" + self.process.log_tail()) from None

    def groups(self) -> list[dict[str, str]]:
        """Grouping-key labels of every group currently held."""
        body = json.loads(http_get(self.url + "/api/v1/metrics"))
        return [g["labels"] for g in body["data"]]

    def stop(self) -> None:
        self.process.stop()


def prometheus_config_for_test(
    archer_targets: list[str],
    pushgateway_target: str | None,
    rules: list[Path],
    interval: str = "1s",
) -> dict[str, Any]:
    """monitoring/prometheus/prometheus.yml with the test's targets, rules and intervals.

    The production file is the base, so its job names, honor_labels and structure are
    what the test exercises; only addresses and timing change.
    """
    import yaml

    base = yaml.safe_load((REPO_ROOT / "monitoring/prometheus/prometheus.yml").read_text())
    base["global"]["scrape_interval"] = interval
    base["global"]["evaluation_interval"] = interval
    base["rule_files"] = [str(p) for p in rules]
    for job in base["scrape_configs"]:
        job.pop("file_sd_configs", None)
        if job["job_name"] == "archer":
            job["static_configs"] = [{"targets": archer_targets}]
        elif job["job_name"] == "pushgateway":
            job["static_configs"] = [
                {"targets": [pushgateway_target] if pushgateway_target else []}
            ]
    return base


# --------------------------------------------------------------------------- munge
class Munge:
    """A real munged with its key, socket and logs in `workdir`."""

    def __init__(self, workdir: Path) -> None:
        binary = require_binary("munged")
        workdir.mkdir(parents=True, exist_ok=True)
        workdir.chmod(0o755)  # munged refuses group/other-writable dirs
        key = workdir / "munge.key"
        key.write_bytes(os.urandom(1024))
        key.chmod(0o400)
        self.socket = workdir / "munge.socket"
        self.process = ManagedProcess(
            "munged",
            [
                binary,
                "--foreground",
                "--force",
                f"--socket={self.socket}",
                f"--key-file={key}",
                f"--log-file={workdir / 'munged.log'}",
                f"--pid-file={workdir / 'munged.pid'}",
                f"--seed-file={workdir / 'munged.seed'}",
            ],
            workdir / "munged.out",
        )
        try:
            wait_until(self.socket.exists, 30, "munged socket")
        except TimeoutError:
            self.process.stop()
            raise RuntimeError("munged did not start:\n" + self.process.log_tail()) from None

    def stop(self) -> None:
        self.process.stop()


# --------------------------------------------------------------------------- Slurm
class SlurmCluster:
    """slurmctld + one slurmd per node name, all on 127.0.0.1 (Slurm's multiple-slurmd
    mode gives each node its own port), munge auth, state and logs in `workdir`.

    Commands (sbatch, scontrol, ...) must run with `env` (it sets SLURM_CONF).
    """

    def __init__(
        self,
        workdir: Path,
        nodes: tuple[str, ...] = ("node1", "node2"),
        cpus_per_node: int = 2,
        gpus_per_node: int = 0,
    ) -> None:
        """`gpus_per_node` > 0: each node has that many GPUs as a `gpu` GRES (gres.conf
        `File=` lines naming character devices: links to /dev/null made here, which
        slurmd accepts; it refuses regular files), so steps that ask for GPUs get the
        CUDA_VISIBLE_DEVICES Slurm's gres/gpu plugin sets."""
        for b in ("slurmctld", "slurmd", "sbatch", "srun", "scontrol", "scancel", "squeue"):
            require_binary(b)
        self.workdir = workdir
        self.nodes = nodes
        workdir.mkdir(parents=True, exist_ok=True)
        self.munge = Munge(workdir / "munge")
        user = _user_name()
        ctld_port = free_port()
        state = workdir / "state"
        state.mkdir()
        (workdir / "log").mkdir()
        node_lines = []
        gres = ""
        if gpus_per_node > 0:
            devices = workdir / "dev"
            devices.mkdir()
            for i in range(gpus_per_node):
                (devices / f"nvidia{i}").symlink_to("/dev/null")
            (workdir / "gres.conf").write_text(
                f"Name=gpu File={devices}/nvidia[0-{gpus_per_node - 1}]\n"
            )
            gres = f" Gres=gpu:{gpus_per_node}"
        for name in nodes:
            (workdir / "spool" / name).mkdir(parents=True)
            node_lines.append(
                f"NodeName={name} NodeHostname=localhost NodeAddr=127.0.0.1 Port={free_port()} "
                f"CPUs={cpus_per_node} RealMemory=1000{gres} State=UNKNOWN"
            )
        conf = f"""\
ClusterName=archertest
{"GresTypes=gpu" if gpus_per_node > 0 else ""}
SlurmctldHost=localhost(127.0.0.1)
SlurmctldPort={ctld_port}
AuthType=auth/munge
AuthInfo=socket={self.munge.socket}
CredType=cred/munge
SlurmUser={user}
SlurmdUser={user}
StateSaveLocation={state}
SlurmdSpoolDir={workdir}/spool/%n
SlurmctldPidFile={workdir}/slurmctld.pid
SlurmdPidFile={workdir}/slurmd-%n.pid
SlurmctldLogFile={workdir}/log/slurmctld.log
SlurmdLogFile={workdir}/log/slurmd-%n.log
SlurmdParameters=config_overrides
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
MailProg=/bin/true
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
MpiDefault=none
ReturnToService=2
JobRequeue=1
MinJobAge=600
KillWait=30
SlurmdTimeout=60
{chr(10).join(node_lines)}
PartitionName=debug Nodes={",".join(nodes)} Default=YES MaxTime=INFINITE State=UP
"""
        self.conf = workdir / "slurm.conf"
        self.conf.write_text(conf)
        self.env = dict(os.environ, SLURM_CONF=str(self.conf))
        for var in [v for v in self.env if v.startswith("SLURM_") and v != "SLURM_CONF"]:
            del self.env[var]  # a test run inside a Slurm job must not leak its job's vars
        self.daemons: list[ManagedProcess] = []
        try:
            self.daemons.append(
                ManagedProcess(
                    "slurmctld",
                    [require_binary("slurmctld"), "-D", "-i"],
                    workdir / "log" / "slurmctld.out",
                    env=self.env,
                    cwd=workdir,
                )
            )
            wait_until(
                lambda: (
                    self.scontrol("ping").returncode == 0 and "UP" in self.scontrol("ping").stdout
                ),
                60,
                "slurmctld to answer ping",
            )
            for name in nodes:
                self.daemons.append(
                    ManagedProcess(
                        f"slurmd-{name}",
                        [require_binary("slurmd"), "-D", "-N", name],
                        workdir / "log" / f"slurmd-{name}.out",
                        env=self.env,
                        cwd=workdir,
                    )
                )
            wait_until(self.nodes_idle, 90, "slurmd nodes to register idle")
        except Exception:
            logs = "\n".join(f"--- {d.name}\n{d.log_tail()}" for d in self.daemons)
            self.stop()
            raise RuntimeError(f"Slurm did not start:\n{logs}") from None

    def run(
        self,
        *argv: str,
        timeout: float = 60,
        cwd: Path | None = None,
        env: dict[str, str] | None = None,
    ) -> subprocess.CompletedProcess[str]:
        """Run a Slurm client command against this cluster."""
        return subprocess.run(
            list(argv),
            capture_output=True,
            text=True,
            timeout=timeout,
            env=self.env | (env or {}),
            cwd=cwd or self.workdir,
        )

    def archer_submit(self, argv: list[str]) -> int:
        """`archer submit ARGV` run in this process (the CLI's own parser and `run`)
        against this cluster: SLURM_CONF points at it for the call only; the exit code."""
        import argparse
        from unittest import mock

        from archer_mcore.cli.submit import add_args, run

        parser = argparse.ArgumentParser()
        add_args(parser)
        args = parser.parse_args(argv)
        with mock.patch.dict(os.environ, {"SLURM_CONF": str(self.conf)}):
            return run(args)

    def scontrol(self, *argv: str) -> subprocess.CompletedProcess[str]:
        return self.run(require_binary("scontrol"), *argv)

    def nodes_idle(self) -> bool:
        """Every node idle: no job or job step (completing included) on it."""
        out = self.run(require_binary("sinfo"), "-h", "-N", "-o", "%N %t").stdout.split()
        states = dict(zip(out[::2], out[1::2]))
        return all(states.get(n) == "idle" for n in self.nodes)

    def job(self, job_id: str) -> dict[str, str]:
        """`scontrol show job` as a key -> value dict (JobState, Restarts, ExitCode, ...)."""
        proc = self.scontrol("show", "job", "-o", job_id)
        if proc.returncode != 0:
            raise RuntimeError(f"scontrol show job {job_id}: {proc.stderr}")
        fields: dict[str, str] = {}
        for token in proc.stdout.split():
            k, sep, v = token.partition("=")
            if sep and k not in fields:
                fields[k] = v
        return fields

    def wait_job(self, job_id: str, states: tuple[str, ...], timeout: float) -> dict[str, str]:
        """Poll until the job is in one of `states`; return its fields."""
        info: dict[str, str] = {}

        def reached() -> bool:
            nonlocal info
            info = self.job(job_id)
            return info.get("JobState") in states

        try:
            wait_until(reached, timeout, f"job {job_id} to reach {states}", interval=0.5)
        except TimeoutError as exc:
            raise TimeoutError(
                f"{exc}; last: {info.get('JobState')} {info.get('Reason')}"
            ) from None
        return info

    def stop(self) -> None:
        """Cancel leftover jobs, then stop slurmd(s), slurmctld and munged by pid."""
        if self.daemons and self.daemons[0].alive():
            with contextlib.suppress(Exception):
                self.run(require_binary("scancel"), "--full", "--user", _user_name(), timeout=30)
                wait_until(
                    lambda: not self.run(require_binary("squeue"), "-h").stdout.strip(),
                    60,
                    "jobs to leave the queue",
                )
        for d in reversed(self.daemons):
            d.stop(timeout=30)
        self.munge.stop()


def _user_name() -> str:
    import pwd

    return pwd.getpwuid(os.getuid()).pw_name


def scrape_metrics(url: str) -> dict[str, dict[tuple, float]]:
    """One scrape of a Prometheus text endpoint: sample name -> {sorted labels: value}."""
    from prometheus_client.parser import text_string_to_metric_families

    text = http_get(url).decode()
    out: dict[str, dict[tuple, float]] = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out.setdefault(s.name, {})[tuple(sorted(s.labels.items()))] = s.value
    return out


def read_train_and_scrape(
    proc: subprocess.Popen, wait_s: float = 60.0
) -> tuple[str, str, dict[str, dict[tuple, float]] | None]:
    """Read a running `archer train` (stdout and stderr piped, text, its own session) to
    its end; once it prints step 1, scrape its exporter (the URL of its "metrics: http"
    line on stderr) until `archer_step` reaches 1, for up to 30 s. The process group is
    killed afterwards whatever happened. Returns (stdout, stderr, the scrape or None)."""
    import threading

    out: list[str] = []
    err: list[str] = []
    url: list[str] = []

    def read_stderr() -> None:
        assert proc.stderr is not None
        for line in proc.stderr:
            err.append(line)
            if line.startswith("metrics: http"):
                url.append(line.split()[1])

    reader = threading.Thread(target=read_stderr, daemon=True)
    reader.start()
    scrape = None
    try:
        assert proc.stdout is not None
        for line in proc.stdout:
            out.append(line)
            if scrape is None and line.startswith("step 1/") and url:
                deadline = time.monotonic() + 30
                while scrape is None and time.monotonic() < deadline:
                    s = scrape_metrics(url[0])
                    if s.get("archer_step") and max(s["archer_step"].values()) >= 1:
                        scrape = s
                    else:
                        time.sleep(0.2)
        proc.wait(timeout=wait_s)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
    reader.join(timeout=10)
    return "".join(out), "".join(err), scrape
