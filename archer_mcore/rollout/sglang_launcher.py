"""Launch SGLang servers and the sglang-router as child processes and wait for health.

`build_server_command` / `build_router_command` produce the exact argv; `ManagedProcess`
runs one in its own process group (so stop() takes its children with it) with its
output in a log file; `wait_healthy` polls GET /health with a deadline and fails early,
with the log tail, if the process exits.

API key (docs/sglang.md "Network exposure"): a per-job secret in a 0600 file holding
`api-key: <key>` (`write_api_key_file`). A server reads it with SGLang's own `--config
FILE` (0.5.23 `server_args.py`: YAML merged into the flags), so the key is not on its
command line. sglang-router 0.3.2 takes keys only as flags (`--api-key`, the key it sends
to workers and requires from clients; `--control-plane-api-keys id:name:role:key`, for
/workers): a `python -m` router is started through `ROUTER_KEY_WRAPPER`, which reads the
file and adds the flags inside the process. SGLang prints its server_args, key included,
at start: the output of a process with a key is copied to its log with the key replaced
(`REDACTED`), and the log file is created 0600.

Launched processes never inherit torchrun's variables (`TORCHRUN_ENV_VARS`, prefixes
`TORCHRUN_ENV_PREFIXES`) nor CUDA_DEVICE_MAX_CONNECTIONS: with
TORCHELASTIC_USE_AGENT_STORE=True a server's own rendezvous would expect an agent store.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import signal
import socket
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

import httpx2

from archer_mcore.rollout.types import RolloutError

SGLANG_SERVER_LAUNCH = (sys.executable, "-m", "sglang.launch_server")
SGLANG_ROUTER_LAUNCH = (sys.executable, "-m", "sglang_router.launch_router")
ROUTER_POLICIES = ("random", "round_robin", "power_of_two", "cache_aware")
#: Variables torchrun / the Slurm script set for the trainer that no launched server or
#: router may inherit (plus every TORCHELASTIC_* name).
TORCHRUN_ENV_VARS = frozenset({
    "MASTER_ADDR", "MASTER_PORT", "RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE",
    "GROUP_RANK", "GROUP_WORLD_SIZE", "ROLE_RANK", "ROLE_WORLD_SIZE", "ROLE_NAME",
    "CUDA_DEVICE_MAX_CONNECTIONS",
})  # fmt: skip
TORCHRUN_ENV_PREFIXES = ("TORCHELASTIC_",)
API_KEY_PREFIX = "api-key:"
REDACTED = "<redacted>"
#: `python -c` program that runs a module (argv[2]) with the key of the file argv[1]
#: appended as sglang-router's --api-key and admin control-plane key; the key never
#: appears on the command line (sglang-router has no config file).
ROUTER_KEY_WRAPPER = (
    "import runpy, sys; f, m = sys.argv[1], sys.argv[2]; "
    "k = open(f).read().split(':', 1)[-1].strip(); "
    "sys.argv = [m, *sys.argv[3:], '--api-key', k, "
    "'--control-plane-api-keys', 'archer:archer:admin:' + k]; "
    "runpy.run_module(m, run_name='__main__', alter_sys=True)"
)


def without_torchrun_env(env: Mapping[str, str]) -> dict[str, str]:
    """`env` without torchrun's variables (TORCHRUN_ENV_VARS, TORCHELASTIC_*)."""
    return {
        k: v
        for k, v in env.items()
        if k not in TORCHRUN_ENV_VARS and not k.startswith(TORCHRUN_ENV_PREFIXES)
    }


def new_api_key() -> str:
    """A fresh per-job secret (256 bits, hex: safe in YAML, argv and sed patterns)."""
    return secrets.token_hex(32)


def write_api_key_file(path: str | Path, key: str) -> Path:
    """Write `api-key: <key>` to a new file readable by its owner only (0600); the
    directory is created 0700. The file is both SGLang's `--config` and the trainer's
    rollout.sglang.api_key_file."""
    path = Path(path)
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    os.fchmod(fd, 0o600)  # an existing file keeps its mode otherwise
    with os.fdopen(fd, "w") as f:
        f.write(f"{API_KEY_PREFIX} {key}\n")
    return path


def read_api_key(path: str | Path) -> str:
    """The key of an API-key file (`api-key: <key>`, or the key alone). Refuses a file
    that group or others may read or write (chmod 600 it) and an empty key."""
    path = Path(path)
    mode = stat.S_IMODE(path.stat().st_mode)
    if mode & 0o077:
        raise PermissionError(
            f"API key file {path} has mode {mode:o}: others could read the key; chmod 600 it"
        )
    text = path.read_text().strip()
    key = text.removeprefix(API_KEY_PREFIX).strip()
    if not key or "\n" in key:
        raise ValueError(f"API key file {path}: expected one line `{API_KEY_PREFIX} <key>`")
    return key


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that was free a moment ago (bind to port 0 and release it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


@dataclass(frozen=True, kw_only=True)
class SGLangServerArgs:
    """Flags of one `python -m sglang.launch_server`.

    skip_tokenizer_init: token ids in, token ids out (the trainer tokenizes).
    load_format: "dummy" starts with random weights (the first sync overwrites them).
    cuda_visible_devices: the GPUs of this server, e.g. "0,1" (None: inherit).
    extra_args: appended verbatim (flags this dataclass does not name).
    env: extra environment variables of the server process, as (name, value) pairs.
    api_key_file: a file from `write_api_key_file`: passed as `--config FILE`, so the
    server requires `Authorization: Bearer <key>` on every endpoint but /health*,
    /ready* and /metrics (0.5.23 `utils/auth.py`).
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
    api_key_file: str | None = None

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
    if args.api_key_file is not None:
        cmd += ["--config", str(args.api_key_file)]
    cmd += list(args.extra_args)
    return cmd


def server_env(args: SGLangServerArgs, base: Mapping[str, str] | None = None) -> dict[str, str]:
    """Environment of a server process. SGLANG_RETURN_ORIGINAL_LOGPROB is forced off so
    that output_token_logprobs are log softmax(z / T) of the sampling temperature (what
    the trainer compares with), not the untempered distribution. torchrun's variables
    are left out (`without_torchrun_env`); args.env may still set any variable."""
    env = without_torchrun_env(os.environ if base is None else base)
    env["SGLANG_RETURN_ORIGINAL_LOGPROB"] = "false"
    if args.cuda_visible_devices is not None:
        env["CUDA_VISIBLE_DEVICES"] = args.cuda_visible_devices
    env.update(dict(args.env))
    return env


@dataclass(frozen=True, kw_only=True)
class RouterArgs:
    """Flags of `python -m sglang_router.launch_router` in front of worker_urls.
    api_key_file: a file from `write_api_key_file`; the router then sends the key to the
    workers and requires it from its clients, and its control plane (/workers) requires
    it too (see `build_router_command`)."""

    worker_urls: tuple[str, ...]
    port: int
    host: str = "127.0.0.1"
    policy: str = "cache_aware"
    health_check_interval_secs: int = 5
    health_check_timeout_secs: int = 5
    health_failure_threshold: int = 2
    extra_args: tuple[str, ...] = field(default_factory=tuple)
    api_key_file: str | None = None
    # the router's own Prometheus exporter: sglang-router 0.3.2 listens on 0.0.0.0:29000
    # unless told (router_args.py), i.e. on every interface, without the key, and on
    # one fixed port per host; here it binds `host`, on this port (None: port + 1)
    metrics_port: int | None = None

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
    """argv of the router. With an API key file: a `PYTHON -m MODULE` launch becomes
    `PYTHON -c ROUTER_KEY_WRAPPER FILE MODULE flags...` (the key is read inside the
    process); any other launch command gets `--api-key KEY --control-plane-api-keys
    archer:archer:admin:KEY` on its command line (visible to `ps` on that host)."""
    flags = ["--worker-urls", *args.worker_urls,
             "--policy", args.policy,
             "--host", args.host,
             "--port", str(args.port),
             "--health-check-interval-secs", str(args.health_check_interval_secs),
             "--health-check-timeout-secs", str(args.health_check_timeout_secs),
             "--health-failure-threshold", str(args.health_failure_threshold),
             "--prometheus-host", args.host,
             "--prometheus-port", str(args.metrics_port or args.port + 1),
             *args.extra_args]  # fmt: skip
    if args.api_key_file is None:
        return [*launch, *flags]
    if len(launch) == 3 and launch[1] == "-m":
        return [launch[0], "-c", ROUTER_KEY_WRAPPER, str(args.api_key_file), launch[2], *flags]
    key = read_api_key(args.api_key_file)
    return [*launch, *flags, "--api-key", key,
            "--control-plane-api-keys", f"archer:archer:admin:{key}"]  # fmt: skip


def secrets_in_argv(argv: Sequence[str]) -> list[str]:
    """API keys a command line carries or points at: the file after `--config` (when it
    is an API-key file), the file of ROUTER_KEY_WRAPPER, the value of `--api-key`."""
    found: list[str] = []
    files = [argv[i + 1] for i, a in enumerate(argv[:-1]) if a == "--config"]
    if len(argv) > 3 and argv[1] == "-c" and argv[2] == ROUTER_KEY_WRAPPER:
        files.append(argv[3])
    for f in files:
        with contextlib.suppress(OSError, ValueError):
            found.append(read_api_key(f))
    found += [argv[i + 1] for i, a in enumerate(argv[:-1]) if a == "--api-key"]
    return found


def _copy_redacted(src: IO[bytes], log_path: Path, secret_words: Sequence[bytes]) -> None:
    """Copy a child's output to its log line by line with every secret replaced."""
    with src, open(log_path, "ab", buffering=0) as log:
        for line in iter(src.readline, b""):
            for word in secret_words:
                line = line.replace(word, REDACTED.encode())
            log.write(line)


def ignoring_stop_warning(argv: Sequence[str]) -> list[str]:
    """`argv` run with SIGUSR1 ignored (a disposition exec keeps; SGLang 0.5.23 and
    sglang-router install no SIGUSR1 handler, so it stays ignored).

    SIGUSR1 is the trainer's "checkpoint and stop" warning (Slurm's --signal, `scancel
    --signal=USR1`). Slurm delivers a step's signal to every process of the step, not
    only to its tasks (slurmstepd signals the step's whole process container, whatever
    the session), so without this the servers a colocated trainer launched die of it
    (the default action) while the trainer is still generating or saving. Set by
    `sh -c 'trap "" USR1; exec "$@"'` rather than a preexec_fn, which is not safe in a
    process with threads."""
    return ["/bin/sh", "-c", 'trap "" USR1; exec "$@"', "archer-managed", *argv]


class ManagedProcess:
    """A child process in its own session, output appended to `log_path`.

    env None: this process's environment without torchrun's variables. A process whose
    command line carries or points at an API key (`secrets_in_argv`) writes its output
    through a pipe that replaces the key by REDACTED; its log file is created 0600."""

    def __init__(
        self,
        argv: Sequence[str],
        env: Mapping[str, str] | None,
        log_path: Path,
        cwd: str | Path | None = None,
    ) -> None:
        self.argv = list(argv)
        self.env = dict(env) if env is not None else without_torchrun_env(os.environ)
        self.secrets = [s.encode() for s in secrets_in_argv(self.argv) if s]
        self.log_path = Path(log_path)
        # `python -m` puts the working directory first on sys.path: run servers outside
        # a source tree whose top-level folders (e.g. kernels/) would shadow packages
        self.cwd = Path(cwd) if cwd is not None else self.log_path.parent
        self.proc: subprocess.Popen[bytes] | None = None
        self.starts = 0

    def start(self) -> None:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        argv = ignoring_stop_warning(self.argv)
        if self.secrets:
            os.close(os.open(self.log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600))
            self.proc = subprocess.Popen(
                argv,
                env=self.env,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
                cwd=self.cwd,
            )
            threading.Thread(
                target=_copy_redacted,
                name=f"log-{self.log_path.name}",
                args=(self.proc.stdout, self.log_path, self.secrets),
                daemon=True,
            ).start()
        else:
            with open(self.log_path, "ab") as log:
                self.proc = subprocess.Popen(
                    argv,
                    env=self.env,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    stdin=subprocess.DEVNULL,
                    start_new_session=True,
                    cwd=self.cwd,
                )
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
