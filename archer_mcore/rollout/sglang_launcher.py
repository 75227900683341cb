"""Launch SGLang servers and the sglang-router as child processes and wait for health.

`build_server_command` / `build_router_command` produce the exact argv; `ManagedProcess`
runs one in its own process group (so stop() takes its children with it) with its
output in a log file; `wait_healthy` polls GET /health with a deadline and fails early,
with the log tail, if the process exits.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import httpx2

from archer_mcore.rollout.types import RolloutError

SGLANG_SERVER_LAUNCH = (sys.executable, "-m", "sglang.launch_server")
SGLANG_ROUTER_LAUNCH = (sys.executable, "-m", "sglang_router.launch_router")
ROUTER_POLICIES = ("random", "round_robin", "power_of_two", "cache_aware")


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that was free a moment ago (bind to port 0 and release it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


@dataclass(frozen=True)
class SGLangServerArgs:
    """Flags of one `python -m sglang.launch_server`.

    skip_tokenizer_init: token ids in, token ids out (the trainer tokenizes).
    load_format: "dummy" starts with random weights (the first sync overwrites them).
    cuda_visible_devices: the GPUs of this server, e.g. "0,1" (None: inherit).
    extra_args: appended verbatim (flags this dataclass does not name).
    env: extra environment variables of the server process, as (name, value) pairs.
    """

    model_path: str
    port: int
    host: str = "127.0.0.1"
    tp_size: int = 1
    dp_size: int = 1
    mem_fraction_static: float = 0.8
    dtype: str = "bfloat16"
    random_seed: int = 0
    skip_tokenizer_init: bool = True
    load_format: str | None = None
    quantization: str | None = None
    enable_memory_saver: bool = False
    deterministic_inference: bool = False
    cuda_visible_devices: str | None = None
    extra_args: tuple[str, ...] = ()
    env: tuple[tuple[str, str], ...] = ()

    def __post_init__(self) -> None:
        if self.tp_size < 1 or self.dp_size < 1:
            raise ValueError(
                f"tp_size and dp_size must be >= 1, got {self.tp_size}, {self.dp_size}"
            )
        if not 0.0 < self.mem_fraction_static < 1.0:
            raise ValueError(
                f"mem_fraction_static must be in (0, 1), got {self.mem_fraction_static}"
            )

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def num_gpus(self) -> int:
        """Workers this server adds to a weight-update group (tp x dp)."""
        return self.tp_size * self.dp_size


def build_server_command(
    args: SGLangServerArgs, launch: Sequence[str] = SGLANG_SERVER_LAUNCH
) -> list[str]:
    """argv of the server launch: `launch` (the program, replaceable by a test's
    stand-in that takes the same flags) followed by the flags."""
    cmd = [*launch,
           "--model-path", args.model_path,
           "--host", args.host,
           "--port", str(args.port),
           "--tp-size", str(args.tp_size),
           "--dp-size", str(args.dp_size),
           "--mem-fraction-static", str(args.mem_fraction_static),
           "--dtype", args.dtype,
           "--random-seed", str(args.random_seed)]  # fmt: skip
    if args.skip_tokenizer_init:
        cmd.append("--skip-tokenizer-init")
    if args.load_format is not None:
        cmd += ["--load-format", args.load_format]
    if args.quantization is not None:
        cmd += ["--quantization", args.quantization]
    if args.enable_memory_saver:
        cmd.append("--enable-memory-saver")
    if args.deterministic_inference:
        cmd.append("--enable-deterministic-inference")
    cmd += list(args.extra_args)
    return cmd


def server_env(args: SGLangServerArgs, base: Mapping[str, str] | None = None) -> dict[str, str]:
    """Environment of a server process. SGLANG_RETURN_ORIGINAL_LOGPROB is forced off so
    that output_token_logprobs are log softmax(z / T) of the sampling temperature (what
    the trainer compares with), not the untempered distribution."""
    env = dict(os.environ if base is None else base)
    env["SGLANG_RETURN_ORIGINAL_LOGPROB"] = "false"
    if args.cuda_visible_devices is not None:
        env["CUDA_VISIBLE_DEVICES"] = args.cuda_visible_devices
    env.update(dict(args.env))
    return env


@dataclass(frozen=True)
class RouterArgs:
    """Flags of `python -m sglang_router.launch_router` in front of worker_urls."""

    worker_urls: tuple[str, ...]
    port: int
    host: str = "127.0.0.1"
    policy: str = "cache_aware"
    health_check_interval_secs: int = 5
    health_check_timeout_secs: int = 5
    health_failure_threshold: int = 2
    extra_args: tuple[str, ...] = field(default_factory=tuple)

    def __post_init__(self) -> None:
        if self.policy not in ROUTER_POLICIES:
            raise ValueError(f"router policy {self.policy!r} not in {ROUTER_POLICIES}")
        if not self.worker_urls:
            raise ValueError("router needs at least one worker url")

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"


def build_router_command(
    args: RouterArgs, launch: Sequence[str] = SGLANG_ROUTER_LAUNCH
) -> list[str]:
    return [*launch,
            "--worker-urls", *args.worker_urls,
            "--policy", args.policy,
            "--host", args.host,
            "--port", str(args.port),
            "--health-check-interval-secs", str(args.health_check_interval_secs),
            "--health-check-timeout-secs", str(args.health_check_timeout_secs),
            "--health-failure-threshold", str(args.health_failure_threshold),
            *args.extra_args]  # fmt: skip


class ManagedProcess:
    """A child process in its own session, output appended to `log_path`."""

    def __init__(self, argv: Sequence[str], env: Mapping[str, str] | None, log_path: Path,
                 cwd: str | Path | None = None) -> None:  # fmt: skip
        self.argv = list(argv)
        self.env = dict(env) if env is not None else None
        self.log_path = Path(log_path)
        # `python -m` puts the working directory first on sys.path: run servers outside
        # a source tree whose top-level folders (e.g. kernels/) would shadow packages
        self.cwd = Path(cwd) if cwd is not None else self.log_path.parent
        self.proc: subprocess.Popen[bytes] | None = None
        self.starts = 0

    def start(self) -> None:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                self.argv, env=self.env, stdout=log, stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL, start_new_session=True, cwd=self.cwd,
            )  # fmt: skip
        self.starts += 1

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    @property
    def returncode(self) -> int | None:
        return None if self.proc is None else self.proc.poll()

    def stop(self, grace_s: float = 10.0) -> None:
        """SIGTERM the process group, SIGKILL after grace_s; reaps the child."""
        if self.proc is None:
            return
        if self.proc.poll() is None:
            for sig, wait_s in ((signal.SIGTERM, grace_s), (signal.SIGKILL, 10.0)):
                try:
                    os.killpg(self.proc.pid, sig)
                except ProcessLookupError:
                    break
                try:
                    self.proc.wait(timeout=wait_s)
                    break
                except subprocess.TimeoutExpired:
                    continue
        else:  # leader gone: still take down anything left in its group
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.proc.pid, signal.SIGKILL)

    def log_tail(self, max_chars: int = 2000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-max_chars:]
        except OSError:
            return ""


def wait_healthy(
    url: str,
    deadline_s: float,
    process: ManagedProcess | None = None,
    path: str = "/health",
    interval_s: float = 0.2,
) -> None:
    """Poll GET url+path until it answers 200. Raises RolloutError when the deadline
    passes or the process exits first (with its exit code and log tail)."""
    end = time.monotonic() + deadline_s
    last = "no answer"
    with httpx2.Client(timeout=2.0, trust_env=False) as client:
        while True:
            if process is not None and process.proc is not None and not process.alive:
                raise RolloutError(
                    f"server process for {url} exited with code {process.returncode} before "
                    f"becoming healthy; log tail ({process.log_path}):\n{process.log_tail()}"
                )
            try:
                r = client.get(url + path)
                if r.status_code == 200:
                    return
                last = f"HTTP {r.status_code}"
            except httpx2.HTTPError as e:
                last = f"{type(e).__name__}: {e}"
            if time.monotonic() >= end:
                tail = process.log_tail() if process is not None else ""
                raise RolloutError(
                    f"{url}{path} not healthy within {deadline_s:.0f}s (last: {last}); "
                    f"log tail:\n{tail}"
                )
            time.sleep(interval_s)
