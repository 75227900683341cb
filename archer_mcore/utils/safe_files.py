"""Files the trainer creates, appends to or deletes in a run directory or a checkpoint
root, handled without ever following a symbolic link there.

A link (or a hard link, or a FIFO) placed where the trainer writes a run file would
otherwise make it, often running as root, truncate or append to the file it points at.
So:

- `open_run_file` opens with ``O_NOFOLLOW`` (a symlinked last component is refused) and
  checks that what it opened is a regular file with no other hard link;
- `write_atomic` writes ``NAME.tmp`` created with ``O_EXCL | O_NOFOLLOW`` (a stale
  regular one is removed first; a link there is refused) and renames it over ``NAME``
  (the rename replaces a link at ``NAME`` itself, never its target);
- `append_line` appends through `open_run_file`;
- `remove_entry` deletes a file, a link (the link, never its target) or a directory
  tree (`shutil.rmtree` does not follow links inside it);
- `check_plain_entry` refuses a symlinked / hard-linked / non-regular entry up front,
  so that a run stops before any work rather than at its first write.

Every refusal is an `UnsafePathError` naming the path and saying what to do.
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import stat
from pathlib import Path

_NOFOLLOW = os.O_NOFOLLOW | os.O_CLOEXEC
# O_NONBLOCK: opening a FIFO planted at a run file's name must not hang the run; it is
# refused below as "not a regular file" (no effect on regular files).
_OPEN_FLAGS = _NOFOLLOW | os.O_NONBLOCK


class UnsafePathError(RuntimeError):
    """A run file's name is taken by a symbolic link, a hard link to another file, or
    something that is not a regular file; the trainer refuses to write through it."""


def _describe(path: Path, st: os.stat_result) -> str | None:
    """Why the entry `path` (lstat `st`) is not a plain file of its own; None if it is."""
    if stat.S_ISLNK(st.st_mode):
        try:
            target = os.readlink(path)
        except OSError:
            target = "?"
        return f"is a symbolic link (to {target})"
    if not stat.S_ISREG(st.st_mode):
        return "is not a regular file"
    if st.st_nlink > 1:
        return f"is a hard link ({st.st_nlink} names for one file)"
    return None


def _refusal(path: Path, why: str) -> UnsafePathError:
    return UnsafePathError(
        f"{path} {why}; archer does not write through links into other files: "
        "remove it (or choose another output directory)"
    )


def check_plain_entry(path: str | Path, directory: bool = False) -> None:
    """Refuse `path` when it exists and is a symbolic link, or (a file) a hard link or
    not a regular file; (`directory`) a directory's entry may only be a real directory.
    Nothing when it does not exist."""
    path = Path(path)
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if directory:
        if stat.S_ISLNK(st.st_mode):
            raise _refusal(path, f"is a symbolic link (to {os.readlink(path)})")
        if not stat.S_ISDIR(st.st_mode):
            raise _refusal(path, "is not a directory")
        return
    why = _describe(path, st)
    if why:
        raise _refusal(path, why)


def open_run_file(path: str | Path, flags: int, mode: int = 0o644) -> int:
    """os.open `path` with `flags` (plus O_NOFOLLOW), refusing a link or a non-regular
    file with UnsafePathError; returns the descriptor."""
    path = Path(path)
    try:
        fd = os.open(path, flags | _OPEN_FLAGS, mode)
    except OSError as exc:
        if exc.errno in (errno.ELOOP, errno.ENXIO, errno.EMLINK):
            check_plain_entry(path)  # names what is there
            raise _refusal(path, "cannot be opened as a plain file") from None
        raise
    try:
        why = _describe(path, os.fstat(fd))
    except BaseException:
        os.close(fd)
        raise
    if why:
        os.close(fd)
        raise _refusal(path, why)
    return fd


def append_line(path: str | Path, line: str) -> None:
    """Append `line` to the file `path` (created when missing), never through a link."""
    fd = open_run_file(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT)
    with os.fdopen(fd, "a") as f:
        f.write(line)


def fsync_dir(path: str | Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomic(path: str | Path, data: str | bytes, durable: bool = True) -> None:
    """Replace `path` with `data`: written to ``path.tmp`` (created exclusively, never
    through a link: a stale regular one is removed, a link there is refused), then
    renamed over `path` (a link at `path` is replaced, its target untouched). `durable`:
    fsync the file and the directory."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    try:
        st = os.lstat(tmp)
    except FileNotFoundError:
        pass
    else:
        if stat.S_ISLNK(st.st_mode) or not stat.S_ISREG(st.st_mode):
            raise _refusal(tmp, _describe(tmp, st) or "is not a regular file")
        os.unlink(tmp)  # a regular leftover of an interrupted write: unlinking it is safe
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | _NOFOLLOW, 0o644)
    except FileExistsError:  # something appeared there since the unlink above
        raise _refusal(tmp, "appeared while it was being written") from None
    raw = data.encode() if isinstance(data, str) else data
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(raw)
            f.flush()
            if durable:
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    if durable:
        fsync_dir(path.parent)


def remove_entry(path: str | Path) -> None:
    """Delete `path`: a file or a link (the link itself, never what it points at), or a
    directory tree (links inside it are removed, not followed). Nothing if absent."""
    path = Path(path)
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if stat.S_ISDIR(st.st_mode):
        shutil.rmtree(path)
    else:
        os.unlink(path)


def resolves_inside(path: str | Path, root: str | Path) -> bool:
    """Whether `path`, with every link resolved, lies inside `root` (links resolved too)."""
    return Path(os.path.realpath(path)).is_relative_to(os.path.realpath(root))
