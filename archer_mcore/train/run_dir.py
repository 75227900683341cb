"""The output directory of a training run: one run at a time, and no silent reuse.

- `RunDirLock`: an exclusive `fcntl.flock` on ``<dir>/.archer.lock`` held for the whole
  run by global rank 0. The file holds the holder's pid; a second run finds the lock
  taken and stops with a message naming that pid. The kernel drops a flock when its
  holder dies (however it dies), so a lock file left by a dead process is stale by
  construction: the next run takes it over and says so.
- `check_fresh_start`: a run started without ``--resume`` into a checkpoint directory
  that already holds checkpoints refuses (its saves would interleave with the earlier
  run's and keep-last-K pruning would delete them), unless ``--overwrite`` asks for the
  earlier checkpoints (and metrics.jsonl) to be deleted first.
- `check_run_files`: the files a run creates or appends to in its directories (the
  lock, metrics.jsonl, ``latest.tmp``, eval/) must not be links: a planted link would
  make the trainer write into the file it points at, so the run refuses before any
  work, naming it. The writers themselves never follow a link either
  (`archer_mcore.utils.safe_files`), and ``--overwrite`` deletes links, not their
  targets.
- `parameters_finite`: after an optimizer step, whether every weight is finite on
  every rank; the loop stops with `NonFiniteParametersError` instead of syncing or
  checkpointing NaN weights.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
from pathlib import Path
from types import TracebackType

import torch

from archer_mcore.parallel.ranks import any_rank
from archer_mcore.train.log import log
from archer_mcore.utils.safe_files import (
    UnsafePathError,
    check_plain_entry,
    open_run_file,
    remove_entry,
)

LOCK_NAME = ".archer.lock"


class RunDirError(RuntimeError):
    """The output directory cannot be used as asked (locked, or holds another run)."""


class NonFiniteParametersError(RuntimeError):
    """An optimizer step left non-finite weights; nothing after it was saved."""


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except OSError as exc:
        return exc.errno == errno.EPERM
    return True


class RunDirLock:
    """Exclusive lock on a directory for the lifetime of a run (a context manager).

    `acquire` raises RunDirError naming the holder's pid when another process holds
    it; `stale_pid` is set when the file named a process that no longer runs."""

    def __init__(self, directory: str | Path) -> None:
        self.directory = Path(directory)
        self.path = self.directory / LOCK_NAME
        self.fd: int | None = None
        self.stale_pid: int | None = None

    def acquire(self) -> RunDirLock:
        self.directory.mkdir(parents=True, exist_ok=True)
        try:  # never through a link: the pid would be written into what it points at
            fd = open_run_file(self.path, os.O_RDWR | os.O_CREAT)
        except UnsafePathError as exc:
            raise RunDirError(str(exc)) from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise
            raise RunDirError(
                f"{self.directory} is in use by another archer run (pid {holder}, lock "
                f"{self.path}); wait for it to finish or choose another train.output_dir"
            ) from None
        previous = os.pread(fd, 64, 0).decode(errors="replace").strip()
        if previous.isdigit() and int(previous) != os.getpid() and not _pid_alive(int(previous)):
            self.stale_pid = int(previous)
            log.info(
                f"archer: {self.path}: stale lock of pid {previous} (no longer running) taken over",
                stderr=True,
            )
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        os.fsync(fd)
        self.fd = fd
        return self

    def release(self) -> None:
        """Unlock (the file stays: unlinking it would let a process that opened the old
        file and a new one each hold "the" lock)."""
        if self.fd is None:
            return
        with contextlib.suppress(OSError):
            os.ftruncate(self.fd, 0)
        os.close(self.fd)  # closing the descriptor drops the flock
        self.fd = None

    def __enter__(self) -> RunDirLock:
        return self.acquire() if self.fd is None else self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.release()


def existing_checkpoints(root: Path) -> list[Path]:
    """Step directories (finished or not) and unfinished saves under a checkpoint root,
    links named like them included (never followed)."""
    if not root.is_dir():
        return []
    return sorted(
        p
        for p in root.iterdir()
        if (p.is_dir() or p.is_symlink()) and p.name.startswith(("step_", ".tmp-step_"))
    )


#: Run files that archer creates or appends to: relative to the output directory ...
OUTPUT_FILES = (LOCK_NAME, "metrics.jsonl")
OUTPUT_DIRS = ("eval",)
#: ... and to the checkpoint root (``latest`` itself is replaced by a rename, which
#: never writes through a link).
CHECKPOINT_FILES = ("latest.tmp",)


def check_run_files(output_dir: Path, checkpoint_root: Path) -> None:
    """RunDirError naming the first run file (or eval/ directory) that is a symbolic
    link, a hard link or not a regular file: the run would write into what it points
    at. Checked before any work; the writers refuse links on their own as well."""
    entries = [(output_dir / n, False) for n in OUTPUT_FILES]
    entries += [(output_dir / n, True) for n in OUTPUT_DIRS]
    entries += [(checkpoint_root / n, False) for n in CHECKPOINT_FILES]
    for path, is_dir in entries:
        try:
            check_plain_entry(path, directory=is_dir)
        except UnsafePathError as exc:
            raise RunDirError(str(exc)) from None


def _delete(paths: list[Path]) -> None:
    """Delete each path: a link (the link itself, never its target), a file or a tree;
    RunDirError naming the one that cannot be deleted."""
    for p in paths:
        try:
            remove_entry(p)
        except OSError as exc:
            raise RunDirError(
                f"--overwrite: cannot delete {p} ({exc.strerror or exc}); delete it by hand"
            ) from None


def check_fresh_start(
    checkpoint_root: Path, output_dir: Path, resume: bool, overwrite: bool, delete: bool = True
) -> list[Path]:
    """Refuse a fresh run into a checkpoint root that holds checkpoints, unless
    `overwrite`: then delete them, ``latest`` and the earlier run's metrics.jsonl (only
    when `delete`: one rank deletes, the others just pass; a link among them is deleted
    itself, never what it points at). Returns what was (or would be) deleted.
    RunDirError for --resume together with --overwrite, or for what cannot be deleted."""
    if resume and overwrite:
        raise RunDirError("--resume and --overwrite contradict each other; pass one")
    found = existing_checkpoints(checkpoint_root)
    if resume or not found:
        return []
    if not overwrite:
        names = ", ".join(p.name for p in found[-3:])
        more = f" and {len(found) - 3} more" if len(found) > 3 else ""
        raise RunDirError(
            f"{checkpoint_root} already holds checkpoints of an earlier run ({names}{more}); "
            "pass --resume to continue that run, choose another train.output_dir (or "
            "checkpoint.dir), or pass --overwrite to delete them and start over"
        )
    doomed = [
        *found,
        checkpoint_root / "latest",
        checkpoint_root / "latest.tmp",
        output_dir / "metrics.jsonl",
    ]
    if delete:
        _delete(doomed)
        log.info(
            f"archer: --overwrite: deleted {len(found)} checkpoint(s) under {checkpoint_root}",
            stderr=True,
        )
    return doomed


def parameters_finite(model: torch.nn.Module) -> bool:
    """Collective (every rank of the job): True when every parameter on every rank is
    finite. One reduction, no per-tensor host sync."""
    params = list(model.parameters())
    device = params[0].device if params else torch.device("cpu")
    bad = torch.zeros((), dtype=torch.int64, device=device)
    for p in params:
        bad += (~torch.isfinite(p.detach())).sum()
    return not any_rank(int(bad.item()) != 0)  # a host-side flag: parallel/ranks.py
