"""The sandbox's value types: per-run limits (`SandboxLimits`, with the range each
limit must lie in), the protections a machine supports (`Isolation`, one flag per
namespace) and what one run did (`SandboxRun`). The sandbox itself is
`archer_mcore.rewards.sandbox`, which re-exports these names.
"""

from __future__ import annotations

import math
import signal
from dataclasses import dataclass


@dataclass(frozen=True, kw_only=True)
class SandboxLimits:
    """Per-run limits.

    wall_s: wall-clock seconds before the run is killed.
    cpu_s: CPU seconds (RLIMIT_CPU; SIGXCPU then SIGKILL).
    memory_mb: address-space cap of each process (RLIMIT_AS), MiB.
    file_size_mb: largest file the program may write, stdout included (RLIMIT_FSIZE).
    tmpfs_mb: size of the writable work directory, MiB.
    max_processes: processes and threads of the run's uid (RLIMIT_NPROC). Memory is
        capped per process, so a run can use up to max_processes * memory_mb.
    max_open_files: RLIMIT_NOFILE.
    max_output_bytes: stdout/stderr bytes read back; more is flagged as an overflow.
    """

    wall_s: float = 10.0
    cpu_s: float = 10.0
    memory_mb: int = 1024
    file_size_mb: int = 16
    tmpfs_mb: int = 64
    max_processes: int = 8
    max_open_files: int = 64
    max_output_bytes: int = 4 * 1024 * 1024

    def __post_init__(self) -> None:
        for name, (low, high) in LIMIT_RANGES.items():
            value = getattr(self, name)
            ok = isinstance(value, (int, float)) and not isinstance(value, bool)
            if not ok or not (math.isfinite(value) and low <= value <= high):
                raise ValueError(
                    f"SandboxLimits.{name} = {value!r} is out of range: must be a number in "
                    f"[{low}, {high}] (a limit the kernel refuses would fail every run's setup)"
                )


#: Accepted range of each `SandboxLimits` field (beyond it the kernel refuses the
#: rlimit, or the value is nonsense: a wall limit of 1e30 s, RLIMIT_NOFILE above
#: fs.nr_open's default).
LIMIT_RANGES: dict[str, tuple[float, float]] = {
    "wall_s": (0.05, 86_400.0),
    "cpu_s": (0.05, 86_400.0),
    "memory_mb": (1, 1 << 30),
    "file_size_mb": (1, 1 << 30),
    "tmpfs_mb": (1, 1 << 20),
    "max_processes": (1, 1 << 22),
    "max_open_files": (3, 1 << 20),
    "max_output_bytes": (1, 1 << 40),
}


@dataclass(frozen=True, kw_only=True)
class Isolation:
    """Which protections this machine supports (probed once per process)."""

    net: bool
    mount: bool
    pid: bool
    detail: str = ""
    ipc: bool = False
    uts: bool = False
    cgroup: bool = False
    time: bool = False


#: The namespaces `probe_isolation` tries, each an `Isolation` field.
NAMESPACES: tuple[str, ...] = ("net", "mount", "pid", "ipc", "uts", "cgroup", "time")


@dataclass(frozen=True, kw_only=True)
class SandboxRun:
    """What one run did. exit_code: the program's exit status (128 + signal if killed)."""

    exit_code: int | None
    stdout: bytes
    stderr: bytes
    timed_out: bool
    output_overflow: bool
    setup_failed: bool
    wall_s: float
    setup_error: str = ""  # the launcher's report when setup_failed

    @property
    def ok(self) -> bool:
        return self.exit_code == 0 and not (
            self.timed_out or self.output_overflow or self.setup_failed
        )

    def describe(self) -> str:
        if self.setup_failed:
            return "sandbox setup failed: " + self.setup_error[-300:]
        if self.timed_out:
            return f"wall-time limit exceeded ({self.wall_s:.1f}s)"
        if self.output_overflow:
            return "output limit exceeded"
        if self.exit_code is not None and self.exit_code > 128:
            try:
                name = signal.Signals(self.exit_code - 128).name
            except ValueError:
                name = str(self.exit_code - 128)
            return f"killed by {name}"
        if self.exit_code:
            tail = self.stderr.decode(errors="replace").strip().splitlines()[-1:] or [""]
            return f"exit code {self.exit_code}: {tail[0][:300]}"
        return "ok"
