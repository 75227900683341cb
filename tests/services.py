"""Real servers for the integration tests: Prometheus, Pushgateway, munge, Slurm.

Each server runs from the Debian package's binary on 127.0.0.1 with free ports and
all state in a temp dir, is started as a child process and stopped by its pid
(SIGTERM, then SIGKILL). Binaries come from scripts/install_services.sh. A missing
binary skips the test, except under CI=true where it fails: CI must run them.

Import from a test directory's conftest with `sys.path.insert(0, <tests dir>)`.
"""

from __future__ import annotations

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
