"""Run untrusted programs in a sandbox: one fresh process and directory per run.

Each `Sandbox.run` writes the run's files to a new temporary directory and starts
`sandbox_launcher.py`, which puts the program in new network, mount, PID, IPC, UTS,
cgroup and time namespaces (where the OS allows), chroots it into a minimal root (read-only system
directories, a minimal /etc, a /proc showing only the run's own processes and a
size-capped tmpfs work directory; the trainer's files, data sets and /tmp are not
visible), applies CPU-time, address-space, file-size, process-count and open-file
limits, drops to an unprivileged uid (a distinct one per concurrent run, so
process-count limits do not interfere), empties that uid's keyrings (uids repeat) and
execs the program with a scrubbed environment. Nothing a run creates survives it: its
processes, files, System V IPC objects and message queues (its own IPC namespace; where
there is none, the uid's System V objects are removed after the run) and keys. The parent enforces the wall-clock limit (SIGKILL to the launcher's
process group; the PID namespace then takes every descendant with it) and caps the
output it reads.

Nothing outlives its parent: if the trainer dies (even by SIGKILL) the launcher gets
SIGTERM (PR_SET_PDEATHSIG), kills the run and removes the run's temporary directory;
if the launcher dies, the namespace's init and the program die with it. Otherwise the
trainer removes the directory after the run.

A run whose sandbox could not be set up says so in `SandboxRun.setup_failed` /
`setup_error`, reported by the launcher on a pipe the program never holds (a program
cannot fake it); the code reward scores it as a fault, not a wrong answer.

Network isolation is required: if a new network namespace cannot be created,
`Sandbox` refuses to construct (`SandboxUnavailableError`) unless
`allow_unsandboxed=True`, in which case programs run with the remaining protections.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import itertools
import json
import os
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

from archer_mcore.rewards import sandbox_launcher

# the value types, re-exported: importers name them from this module
from archer_mcore.rewards.sandbox_types import LIMIT_RANGES as LIMIT_RANGES
from archer_mcore.rewards.sandbox_types import NAMESPACES, Isolation, SandboxLimits, SandboxRun

_LAUNCHER = Path(sandbox_launcher.__file__).resolve()
#: What a sandboxed program sees of the host, read-only (when a mount namespace is
#: available); the interpreter's prefix is added if it lies elsewhere.
SYSTEM_DIRS: tuple[str, ...] = (
    "/usr",
    "/bin",
    "/sbin",
    "/lib",
    "/lib32",
    "/lib64",
    "/libx32",
)
#: The only host files of /etc a program sees (copies): the dynamic loader's cache and
#: configuration and the time zone. passwd, group and hosts are synthetic (root, the
#: run's uid, localhost); see `sandbox_launcher._write_etc`.
ETC_FILES: tuple[str, ...] = ("ld.so.cache", "ld.so.conf", "localtime")
#: The program's writable working directory inside its root.
INNER_WORKDIR = "/sandbox"
SETUP_FAILED_EXIT = sandbox_launcher.SETUP_FAILED_EXIT


class SandboxUnavailableError(RuntimeError):
    """Code execution was refused because the required isolation is not available."""


def _world_executable(path: Path) -> bool:
    """True if an unprivileged uid can execute `path` (every parent traversable)."""
    try:
        path = path.resolve()
        if not path.stat().st_mode & stat.S_IXOTH:
            return False
        return all(p.stat().st_mode & stat.S_IXOTH for p in path.parents)
    except OSError:
        return False


def default_python() -> str:
    """A Python interpreter an unprivileged uid can run: this one if possible, else python3."""
    if _world_executable(Path(sys.executable)):
        return str(Path(sys.executable).resolve())
    for candidate in ("/usr/bin/python3", "/usr/local/bin/python3", shutil.which("python3")):
        if candidate and _world_executable(Path(candidate)):
            return str(Path(candidate).resolve())
    raise SandboxUnavailableError(
        "no Python interpreter is executable by an unprivileged user; pass python=..."
    )


_uid_counter = itertools.count()
_uid_lock = threading.Lock()


def _next_uid(base: int) -> int:
    """A uid for one run: distinct among this process's concurrent runs (1000 slots) and,
    through the pid, very likely distinct from other trainer processes on the node."""
    with _uid_lock:
        n = next(_uid_counter)
    return base + (os.getpid() % 4000) * 1000 + n % 1000


def _launch(spec: dict, stdin: bytes, limits: SandboxLimits, scratch: Path) -> SandboxRun:
    stdin_path, out_path, err_path = scratch / "stdin", scratch / "stdout", scratch / "stderr"
    stdin_path.write_bytes(stdin)
    start = time.monotonic()
    spec_r, spec_w = os.pipe()
    status_r, status_w = os.pipe()
    try:
        with (
            open(stdin_path, "rb") as fin,
            open(out_path, "wb") as fout,
            open(err_path, "wb") as ferr,
        ):
            proc = subprocess.Popen(
                [sys.executable, "-I", "-S", str(_LAUNCHER), str(spec_r), str(status_w)],
                stdin=fin,
                stdout=fout,
                stderr=ferr,
                env={},
                close_fds=True,
                pass_fds=(spec_r, status_w),
                start_new_session=True,
            )
    except BaseException:
        os.close(spec_w)
        os.close(status_r)
        raise
    finally:
        os.close(spec_r)
        os.close(status_w)
    with contextlib.suppress(BrokenPipeError), open(spec_w, "wb") as pipe:
        pipe.write(json.dumps(spec).encode())  # EOF on close; a dead launcher: ignored
    timed_out = False
    try:
        proc.wait(timeout=limits.wall_s)
    except subprocess.TimeoutExpired:
        timed_out = True
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    wall = time.monotonic() - start
    setup_error = _setup_error(_read_status(status_r), proc.returncode)

    fsize = spec["limits"]["fsize_bytes"]

    def read_capped(path: Path) -> tuple[bytes, bool]:
        # Reaching RLIMIT_FSIZE means the program was stopped mid-write (Python ignores
        # SIGXFSZ and gets EFBIG instead of being killed): an overflow as well.
        size = path.stat().st_size
        with open(path, "rb") as f:
            data = f.read(limits.max_output_bytes)
        return data, size > limits.max_output_bytes or size >= fsize

    out, out_over = read_capped(out_path)
    err, err_over = read_capped(err_path)
    code = proc.returncode
    exit_code = None if timed_out else (128 - code if code < 0 else code)
    # RLIMIT_FSIZE kills an over-long print with SIGXFSZ: that is an output overflow too.
    overflow = out_over or err_over or exit_code == 128 + signal.SIGXFSZ
    return SandboxRun(
        exit_code=exit_code,
        stdout=out,
        stderr=err,
        timed_out=timed_out,
        output_overflow=overflow,
        setup_failed=bool(setup_error),
        wall_s=wall,
        setup_error=setup_error,
    )


def _read_status(fd: int) -> bytes:
    """What the launcher wrote on the status pipe. Never blocks: it is written before
    the launcher exits, and a straggler of a killed run may still hold the write end."""
    try:
        os.set_blocking(fd, False)
        return os.read(fd, 4096)
    except BlockingIOError:
        return b""
    finally:
        os.close(fd)


def _setup_error(status: bytes, returncode: int) -> str:
    """The setup failure a run's status pipe reports ("" when the sandbox was set up):
    the launcher's own message, or, without its STARTED mark, that it never got to
    start the run (it could not start, or was killed first)."""
    started = status.startswith(sandbox_launcher.STARTED)
    message = status[len(sandbox_launcher.STARTED) if started else 0 :]
    text = message.decode(errors="replace").strip()
    if not started:
        return text or f"the sandbox launcher exited (status {returncode}) before starting the run"
    return text


def _kill_uid_processes(uid: int) -> None:
    """Without a PID namespace: SIGKILL whatever the run's uid left behind."""
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            if os.stat(f"/proc/{entry}").st_uid == uid:
                os.kill(int(entry), signal.SIGKILL)
        except (OSError, ProcessLookupError):
            continue


IPC_RMID = 0


def _remove_uid_ipc(uid: int) -> None:
    """Without an IPC namespace: remove the System V shared memory segments, semaphore
    sets and message queues that `uid` created or owns (from /proc/sysvipc)."""
    removers = {  # /proc/sysvipc file: (its id column, remove(id))
        "shm": ("shmid", lambda ident: _libc.shmctl(ident, IPC_RMID, None)),
        "sem": ("semid", lambda ident: _libc.semctl(ident, 0, IPC_RMID)),
        "msg": ("msqid", lambda ident: _libc.msgctl(ident, IPC_RMID, None)),
    }
    for kind, (id_column, remove) in removers.items():
        try:
            header, *rows = Path(f"/proc/sysvipc/{kind}").read_text().splitlines()
        except (OSError, ValueError):
            continue
        names = header.split()
        for row in rows:
            fields = dict(zip(names, row.split()))
            if str(uid) in (fields.get("uid"), fields.get("cuid")) and id_column in fields:
                remove(int(fields[id_column]))


_libc = ctypes.CDLL(None, use_errno=True)


class Sandbox:
    """Runs programs under `limits`; thread-safe, one process per `run`.

    python: interpreter for `run_python` (default: `default_python()`).
    allow_unsandboxed: run code even without a network namespace (never by default).
    base_uid: first uid of the range given to runs (unprivileged, no passwd entry needed).
    scratch_root: where per-run temporary directories are made (default: the system's).
    """

    def __init__(
        self,
        limits: SandboxLimits | None = None,
        python: str | None = None,
        allow_unsandboxed: bool = False,
        base_uid: int = 100_000,
        scratch_root: str | None = None,
    ) -> None:
        self.limits = limits or SandboxLimits()
        self.base_uid = base_uid
        self.scratch_root = scratch_root
        self.can_setuid = os.geteuid() == 0
        self.isolation = (
            probe_isolation()
            if self.can_setuid
            else Isolation(net=False, mount=False, pid=False, detail="not root")
        )
        if not self.isolation.net and not allow_unsandboxed:
            raise SandboxUnavailableError(
                "refusing to run untrusted code: cannot create a network namespace "
                f"({self.isolation.detail}); set rewards.allow_unsandboxed_code to override"
            )
        self.python = python or default_python()
        prefix = str(Path(self.python).resolve().parents[1])
        self.root_binds = list(SYSTEM_DIRS) + ([prefix] if prefix not in SYSTEM_DIRS else [])

    def run(
        self,
        files: dict[str, str | bytes],
        argv: list[str],
        stdin: bytes = b"",
        limits: SandboxLimits | None = None,
    ) -> SandboxRun:
        """Run `argv` (argv[0] an absolute path) in a fresh directory holding `files`."""
        limits = limits or self.limits
        uid = _next_uid(self.base_uid) if self.can_setuid else os.getuid()
        gid = uid if self.can_setuid else os.getgid()
        scratch = Path(tempfile.mkdtemp(prefix="archer-sbx-", dir=self.scratch_root))
        try:
            scratch.chmod(0o711)  # the uid may traverse (to its work dir) but not list it
            work = scratch / "work"
            work.mkdir(mode=0o700)
            for name, content in files.items():
                if "/" in name or name in ("", ".", ".."):
                    raise ValueError(f"sandbox file names must be plain names, got {name!r}")
                data = content.encode() if isinstance(content, str) else content
                (work / name).write_bytes(data)
                if self.can_setuid:
                    os.chown(work / name, uid, gid)
            if self.can_setuid:
                os.chown(work, uid, gid)
            inner = INNER_WORKDIR if self.isolation.mount else str(work)
            (scratch / "root").mkdir(mode=0o700)
            spec = _launch_spec(
                scratch,
                work,
                inner=inner,
                root_binds=self.root_binds,
                argv=argv,
                env=scrubbed_env(inner),
                uid=uid,
                gid=gid,
                limits=limits,
                isolation=self.isolation,
            )
            return _launch(spec, stdin, limits, scratch)
        finally:
            if not self.isolation.pid and self.can_setuid:
                _kill_uid_processes(uid)
            if not self.isolation.ipc and self.can_setuid:
                _remove_uid_ipc(uid)
            shutil.rmtree(scratch, ignore_errors=True)

    def run_python(
        self,
        source: str,
        stdin: bytes = b"",
        extra_files: dict[str, str | bytes] | None = None,
        limits: SandboxLimits | None = None,
    ) -> SandboxRun:
        """Run Python `source` as main.py (isolated mode, no bytecode written)."""
        files: dict[str, str | bytes] = {"main.py": source, **(extra_files or {})}
        return self.run(files, [self.python, "-I", "-B", "main.py"], stdin, limits)

    def describe(self) -> str:
        return f"Sandbox(isolation={asdict(self.isolation)}, limits={asdict(self.limits)})"


#: The isolation probe's trivial run (`env true`): generous process and file limits.
PROBE_LIMITS = SandboxLimits(
    wall_s=30,
    cpu_s=5,
    memory_mb=256,
    file_size_mb=1,
    tmpfs_mb=1,
    max_processes=10_000,
    max_open_files=64,
)


def _launch_spec(
    scratch: Path,
    work: Path,
    *,
    inner: str,
    root_binds: list[str],
    argv: list[str],
    env: dict[str, str],
    uid: int,
    gid: int,
    limits: SandboxLimits,
    isolation: Isolation,
) -> dict[str, Any]:
    """The JSON spec sandbox_launcher reads: paths, identity, namespaces, rlimits."""
    return {
        "parent_pid": os.getpid(),
        "scratch": str(scratch),
        "etc_files": list(ETC_FILES),
        "workdir": str(work),
        "inner_workdir": inner,
        "new_root": str(scratch / "root"),
        "root_binds": root_binds,
        "argv": argv,
        "env": env,
        "uid": uid,
        "gid": gid,
        "tmpfs_mb": limits.tmpfs_mb,
        **{f"isolate_{name}": getattr(isolation, name) for name in NAMESPACES},
        "limits": {
            "cpu_s": max(1, int(limits.cpu_s + 0.999)),
            "as_bytes": limits.memory_mb * 1024 * 1024,
            "fsize_bytes": limits.file_size_mb * 1024 * 1024,
            "nproc": limits.max_processes,
            "nofile": limits.max_open_files,
        },
    }


def scrubbed_env(workdir: str) -> dict[str, str]:
    """The program's whole environment: nothing inherited from the trainer."""
    return {
        "PATH": "/usr/local/bin:/usr/bin:/bin",
        "HOME": workdir,
        "TMPDIR": workdir,
        "LANG": "C.UTF-8",
        "PYTHONIOENCODING": "utf-8",
        "PYTHONHASHSEED": "0",
        "PYTHONDONTWRITEBYTECODE": "1",
        # numeric libraries would start a thread per core and hit the process limit
        "OMP_NUM_THREADS": "1",
        "OPENBLAS_NUM_THREADS": "1",
        "MKL_NUM_THREADS": "1",
    }


@functools.lru_cache(maxsize=1)
def probe_isolation() -> Isolation:
    """Try each namespace with a trivial launch; report what works on this machine."""
    results: dict[str, bool] = {}
    notes: list[str] = []
    for name in NAMESPACES:
        scratch = Path(tempfile.mkdtemp(prefix="archer-sbx-probe-"))
        try:
            scratch.chmod(0o711)
            work = scratch / "work"
            work.mkdir()
            (scratch / "root").mkdir(mode=0o700)
            probe = Isolation(**{n: n == name for n in NAMESPACES})  # type: ignore[arg-type]
            spec = _launch_spec(
                scratch,
                work,
                inner=INNER_WORKDIR,
                root_binds=list(SYSTEM_DIRS),
                argv=["/usr/bin/env", "true"],
                env={},
                uid=0,
                gid=0,
                limits=PROBE_LIMITS,
                isolation=probe,
            )
            run = _launch(spec, b"", PROBE_LIMITS, scratch)
            results[name] = run.exit_code == 0
            if not results[name]:
                why = run.setup_error or run.stderr.decode(errors="replace").strip()
                notes.append(f"{name}: {why[:200]}")
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
    detail = "; ".join(notes)
    return Isolation(**results, detail=detail)  # type: ignore[arg-type]
